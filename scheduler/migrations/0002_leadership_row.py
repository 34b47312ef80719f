"""The singleton Leadership row (term 0) that every JobRun claim checks against."""

from django.db import migrations


def create_row(apps, schema_editor):  # noqa: ANN001
    apps.get_model("scheduler", "Leadership").objects.get_or_create(id=1, defaults={"term": 0})


class Migration(migrations.Migration):
    dependencies = [("scheduler", "0001_initial")]
    operations = [migrations.RunPython(create_row, migrations.RunPython.noop)]
