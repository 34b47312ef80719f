"""Trade and Fill now belong to the positions app (positions 0003): state only, no table is touched."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("orders", "0003_webhookdelivery"),
        ("positions", "0003_trade_fill"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[],
            state_operations=[
                migrations.DeleteModel(name="Fill"),
                migrations.DeleteModel(name="Trade"),
            ],
        ),
    ]
