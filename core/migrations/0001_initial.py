# MetricCounter moved here from the scheduler app; its table (scheduler_metriccounter) stays where
# scheduler's 0001 created it, so this migration changes only Django's model state.

from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies = [
        ("scheduler", "0003_instance_rss"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[],
            state_operations=[
                migrations.CreateModel(
                    name="MetricCounter",
                    fields=[
                        ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                        ("minute", models.DateTimeField()),
                        ("name", models.CharField(max_length=64)),
                        ("labels", models.CharField(blank=True, default="", max_length=200)),
                        ("value", models.BigIntegerField(default=0)),
                    ],
                    options={
                        "db_table": "scheduler_metriccounter",
                        "constraints": [
                            models.UniqueConstraint(fields=("minute", "name", "labels"), name="metriccounter_unique")
                        ],
                    },
                ),
            ],
        ),
    ]
