"""Trade and Fill move from the orders app to positions (issue 11): state only, the tables keep their names.

The database is untouched (orders_trade, orders_fill, their indexes and constraints stay as they
are); Django's state learns that positions owns them. Content types (and with them the admin
permissions granted on these models) follow the models to their new app.
"""

import django.db.models.deletion
from django.db import migrations, models

MOVED = ("trade", "fill")


def _content_types_move(apps, schema_editor, source: str, target: str) -> None:  # noqa: ANN001
    content_type = apps.get_model("contenttypes", "ContentType")
    rows = content_type.objects.using(schema_editor.connection.alias)
    for model in MOVED:
        if not rows.filter(app_label=target, model=model).exists():
            rows.filter(app_label=source, model=model).update(app_label=target)


def content_types_forward(apps, schema_editor) -> None:  # noqa: ANN001
    _content_types_move(apps, schema_editor, "orders", "positions")


def content_types_backward(apps, schema_editor) -> None:  # noqa: ANN001
    _content_types_move(apps, schema_editor, "positions", "orders")


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0003_capitalsnapshot"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("orders", "0003_webhookdelivery"),
        ("positions", "0002_strategydailyperformance"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[],
            state_operations=[
                migrations.CreateModel(
                    name="Trade",
                    fields=[
                        (
                            "id",
                            models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID"),
                        ),
                        ("exchange_order_id", models.CharField(max_length=64)),
                        ("order_key", models.UUIDField(blank=True, db_index=True, null=True)),
                        ("symbol", models.CharField(max_length=32)),
                        (
                            "market_type",
                            models.CharField(choices=[("SPOT", "Spot"), ("FUTURES", "Futures")], max_length=8),
                        ),
                        ("side", models.CharField(choices=[("BUY", "Buy"), ("SELL", "Sell")], max_length=4)),
                        ("cumulative_filled", models.DecimalField(decimal_places=12, default=0, max_digits=28)),
                        ("average_price", models.DecimalField(decimal_places=12, default=0, max_digits=28)),
                        ("fees", models.DecimalField(decimal_places=12, default=0, max_digits=28)),
                        ("fee_currency", models.CharField(blank=True, max_length=16)),
                        ("realized_pnl", models.DecimalField(decimal_places=12, default=0, max_digits=28)),
                        ("created_at", models.DateTimeField(auto_now_add=True)),
                        ("updated_at", models.DateTimeField(auto_now=True)),
                        (
                            "account",
                            models.ForeignKey(
                                on_delete=django.db.models.deletion.PROTECT, related_name="+", to="accounts.account"
                            ),
                        ),
                        (
                            "strategy_account",
                            models.ForeignKey(
                                on_delete=django.db.models.deletion.PROTECT,
                                related_name="trades",
                                to="accounts.strategyaccount",
                            ),
                        ),
                    ],
                    options={
                        "db_table": "orders_trade",
                        "constraints": [
                            models.UniqueConstraint(
                                fields=("strategy_account", "exchange_order_id"), name="trade_unique_order"
                            )
                        ],
                    },
                ),
                migrations.CreateModel(
                    name="Fill",
                    fields=[
                        (
                            "id",
                            models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID"),
                        ),
                        ("symbol", models.CharField(max_length=32)),
                        ("cum_filled_after", models.DecimalField(decimal_places=12, max_digits=28)),
                        (
                            "delta_qty",
                            models.DecimalField(decimal_places=12, help_text="signed: + buy, - sell", max_digits=28),
                        ),
                        ("price", models.DecimalField(decimal_places=12, max_digits=28)),
                        ("fee", models.DecimalField(decimal_places=12, default=0, max_digits=28)),
                        ("fee_currency", models.CharField(blank=True, max_length=16)),
                        ("realized_pnl", models.DecimalField(decimal_places=12, default=0, max_digits=28)),
                        ("filled_at", models.DateTimeField(db_index=True)),
                        (
                            "source",
                            models.CharField(
                                choices=[("REST", "Rest"), ("STREAM", "Stream"), ("ADJUSTMENT", "Adjustment")],
                                max_length=10,
                            ),
                        ),
                        (
                            "strategy_account",
                            models.ForeignKey(
                                on_delete=django.db.models.deletion.PROTECT,
                                related_name="fills",
                                to="accounts.strategyaccount",
                            ),
                        ),
                        (
                            "trade",
                            models.ForeignKey(
                                blank=True,
                                null=True,
                                on_delete=django.db.models.deletion.PROTECT,
                                related_name="fills",
                                to="positions.trade",
                            ),
                        ),
                    ],
                    options={
                        "db_table": "orders_fill",
                        "indexes": [models.Index(fields=["strategy_account", "symbol"], name="fill_position_idx")],
                        "constraints": [
                            models.UniqueConstraint(fields=("trade", "cum_filled_after"), name="fill_unique_increment")
                        ],
                    },
                ),
            ],
        ),
        migrations.RunPython(content_types_forward, content_types_backward, elidable=True),
    ]
