# MetricCounter now belongs to the core app (core 0001); the table is kept, only the state moves.

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("scheduler", "0003_instance_rss"),
        ("core", "0001_initial"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[],
            state_operations=[migrations.DeleteModel(name="MetricCounter")],
        ),
    ]
