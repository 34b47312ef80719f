"""Plain-SQL reads and writes of model rows, for the few paths where the ORM's query building is the cost.

Building a query costs the ORM about ten times what the database spends answering a short one on
a primary or unique key (measured here: about 0.5 ms of Python for `filter(...).first()` against
0.04 ms for the same statement through a cursor). The simulated exchange runs a dozen such
statements for every order it creates, and the execution engine several for every placement and
every reconciled account market, all on the machine's two cores (bench.fanout), so those paths read
and write through these helpers instead; everything else keeps the ORM. They stay model
rows: columns come from the model's fields, values go through the fields' own conversions both
ways (`get_db_prep_save` out, the backend's and the field's converters in), and the objects are
built by `Model.from_db` as a queryset builds them. Row locks follow what the backend supports, as
`select_for_update` does (none on SQLite, where a write transaction locks the database).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar, cast

from django.db import connection
from django.db.models import Model

M = TypeVar("M", bound=Model)

# The select list, the attnames and each column's converters (with the column they take).
_Loader = tuple[str, list[str], list[tuple[Any, list[Any]]]]
# By (model, fields asked for or None for all, vendor): built once per process.
_LOADERS: dict[tuple[type[Model], tuple[str, ...] | None, str], _Loader] = {}


def _loader(model: type[Model], attnames: tuple[str, ...] | None = None) -> _Loader:
    key = (model, attnames, connection.vendor)
    loader = _LOADERS.get(key)
    if loader is None:
        quote = connection.ops.quote_name
        fields = list(model._meta.concrete_fields)
        if attnames is not None:
            by_name = {f.attname: f for f in fields}
            fields = [by_name[name] for name in attnames]
        select = ", ".join(quote(f.column) for f in fields)
        converters = []
        for f in fields:
            col = f.get_col(model._meta.db_table)
            field_converters = cast(Any, f).get_db_converters(connection)  # not in django-stubs
            converters.append((col, connection.ops.get_db_converters(col) + field_converters))
        loader = _LOADERS[key] = (select, [f.attname for f in fields], converters)
    return loader


def _fetch(
    model: type[Model],
    loader: _Loader,
    where: str,
    params: Sequence[Any],
    *,
    lock: bool,
    skip_locked: bool,
    order_by: str,
    limit: int | None,
) -> list[list[Any]]:
    select, _, converters = loader
    sql = f"SELECT {select} FROM {connection.ops.quote_name(model._meta.db_table)} WHERE {where}"  # noqa: S608
    if order_by:
        sql += f" ORDER BY {order_by}"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    if lock and connection.features.has_select_for_update:
        sql += " FOR UPDATE"
        if skip_locked and connection.features.has_select_for_update_skip_locked:
            sql += " SKIP LOCKED"
    with connection.cursor() as cursor:
        cursor.execute(sql, list(params))
        fetched = cursor.fetchall()
    out = []
    for row in fetched:
        values = list(row)
        for i, (col, convs) in enumerate(converters):
            for conv in convs:
                values[i] = conv(values[i], col, connection)
        out.append(values)
    return out


def rows_select(
    model: type[M],
    where: str,
    params: Sequence[Any],
    *,
    lock: bool = False,
    skip_locked: bool = False,
    order_by: str = "",
    limit: int | None = None,
) -> list[M]:
    """`model` rows matching `where` (SQL over its column names, `%s` placeholders), as full instances.

    `lock`: FOR UPDATE (SKIP LOCKED with `skip_locked`) where the backend has it; call inside
    transaction.atomic, as select_for_update requires.
    """
    loader = _loader(model)
    rows = _fetch(model, loader, where, params, lock=lock, skip_locked=skip_locked, order_by=order_by, limit=limit)
    return [model.from_db(connection.alias, loader[1], values) for values in rows]


def rows_values(
    model: type[Model], attnames: tuple[str, ...], where: str, params: Sequence[Any], *, order_by: str = ""
) -> list[dict[str, Any]]:
    """As `rows_select`, each row as a dict of the `attnames` asked for (as `QuerySet.values`)."""
    loader = _loader(model, attnames)
    rows = _fetch(model, loader, where, params, lock=False, skip_locked=False, order_by=order_by, limit=None)
    return [dict(zip(attnames, values, strict=True)) for values in rows]


def row_select(model: type[M], where: str, params: Sequence[Any], **kwargs: Any) -> M | None:
    """The first row `rows_select` finds (by primary key unless `order_by` says otherwise), or None."""
    kwargs.setdefault("order_by", connection.ops.quote_name(model._meta.pk.column))
    rows = rows_select(model, where, params, limit=1, **kwargs)
    return rows[0] if rows else None


def scalar(sql: str, params: Sequence[Any]) -> Any:
    """The first column of the first row of `sql`, or None when it returns no row."""
    with connection.cursor() as cursor:
        cursor.execute(sql, list(params))
        row = cursor.fetchone()
    return row[0] if row else None


def rows_insert(objs: Sequence[Model], *, conflict: tuple[str, ...] | None = None) -> None:
    """INSERT new `objs` (one model) in one statement, each given its primary key, as saved instances.

    `conflict`: ON CONFLICT (those columns) DO NOTHING; an object whose row was not inserted keeps
    pk None (PostgreSQL and SQLite 3.35+ return the inserted rows' keys in order).
    """
    if not objs:
        return
    opts = objs[0]._meta
    fields = [f for f in opts.concrete_fields if not f.primary_key]
    quote = connection.ops.quote_name
    marks = "(" + ", ".join(["%s"] * len(fields)) + ")"
    params: list[Any] = []
    for obj in objs:
        # As bulk_create: a foreign key set as an object saved since takes that object's key.
        cast(Any, obj)._prepare_related_fields_for_save(operation_name="rows_insert")  # not in django-stubs
        params += [f.get_db_prep_save(f.pre_save(obj, True), connection=connection) for f in fields]
    sql = (
        f"INSERT INTO {quote(opts.db_table)} ({', '.join(quote(f.column) for f in fields)}) "  # noqa: S608
        f"VALUES {', '.join([marks] * len(objs))}"
    )
    if conflict:
        sql += f" ON CONFLICT ({', '.join(quote(c) for c in conflict)}) DO NOTHING"
    sql += f" RETURNING {quote(opts.pk.column)}"
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        keys = [row[0] for row in cursor.fetchall()]
    if conflict and len(keys) != len(objs):
        if len(objs) != 1:
            raise ValueError("rows_insert with `conflict` tells which rows went in for one object only")
        keys = keys + [None]
    for obj, key in zip(objs, keys, strict=False):
        if key is None:
            continue
        obj.pk = key
        for f in fields:  # what the database holds: defaults such as 0 as their Python type (Decimal)
            setattr(obj, f.attname, f.to_python(getattr(obj, f.attname)))
        obj._state.adding = False
        obj._state.db = connection.alias


def row_update(obj: Model, fields: Sequence[str] | None = None) -> int:
    """UPDATE `obj`'s row with its `fields` (attnames; every concrete field but the key when None);
    the number of rows updated (0: the row is gone)."""
    chosen = [f for f in obj._meta.concrete_fields if not f.primary_key and (fields is None or f.attname in fields)]
    return rows_update(type(obj), [obj.pk], **{f.attname: f.pre_save(obj, False) for f in chosen})


def rows_update(model: type[Model], pks: Sequence[Any], **values: Any) -> int:
    """UPDATE the `model` rows with these primary keys to `values` (attnames; each prepared by its field) in
    one statement; the number updated."""
    if not pks:
        return 0
    opts, quote = model._meta, connection.ops.quote_name
    by_name = {f.attname: f for f in opts.concrete_fields}
    sets = ", ".join(f"{quote(by_name[name].column)} = %s" for name in values)
    params = [by_name[name].get_db_prep_save(value, connection=connection) for name, value in values.items()]
    marks = ", ".join(["%s"] * len(pks))
    sql = f"UPDATE {quote(opts.db_table)} SET {sets} WHERE {quote(opts.pk.column)} IN ({marks})"  # noqa: S608
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, *pks])
        return cursor.rowcount


def rows_delete(model: type[Model], **equals: Any) -> int:
    """DELETE the `model` rows whose fields equal `equals` (attnames; values prepared by their fields, so a
    datetime compares as the ORM stored it), in one statement: no cascade and no signals, for a table
    that no foreign key points to. The number deleted."""
    opts, quote = model._meta, connection.ops.quote_name
    where, params = [], []
    for name, value in equals.items():
        field = next(f for f in opts.concrete_fields if f.attname == name)
        where.append(f"{quote(field.column)} = %s")
        params.append(field.get_db_prep_value(value, connection))
    sql = f"DELETE FROM {quote(opts.db_table)} WHERE {' AND '.join(where)}"  # noqa: S608 - the model's names
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount
