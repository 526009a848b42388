"""`--where` filters of pool queries: a small expression language compiled to Arrow.

    class == 'scratch' and score_max < 0.5
    num_boxes >= 2 and not (entropy_max < 0.1)
    class in ['crazing', 'pitted_surface'] or margin_max <= 0.05
    0.2 < score_max <= 0.6

Names are columns of the candidate table (signal columns, `num_boxes`, `class`,
`score_max`); literals are numbers, quoted strings, true/false, and lists of them after
`in` / `not in`. Operators: == != < <= > >=, in, not in, and, or, not, parentheses;
comparisons chain (`a < b < c`). Nothing else is accepted: the text is parsed with
Python's `ast` module and every node is checked against this whitelist and compiled into
a `pyarrow.compute.Expression`, so a filter can never run code. A name that is a Python
keyword (`class`) is accepted as a column name.

Comparisons with a missing value (NaN score of an image without boxes, null) are false,
so `score_max < 0.5` does not keep images without detections; ask `num_boxes == 0` for
those.
"""
from __future__ import annotations

import ast
import io
import keyword
import tokenize

import pyarrow as pa
import pyarrow.compute as pc

MAX_LENGTH = 2000
_KW_SUFFIX = "__kw"
_LOGIC = {"and", "or", "not", "in", "is", "True", "False", "true", "false"}
_CMP = {ast.Eq: "equal", ast.NotEq: "not_equal", ast.Lt: "less", ast.LtE: "less_equal", ast.Gt: "greater",
        ast.GtE: "greater_equal"}


class WhereError(ValueError):
    """A filter that does not parse, or names a column the table lacks."""


def _rename_keywords(text: str) -> str:
    """`class` -> `class__kw` (any Python keyword used as a name), so `ast` parses it."""
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, IndentationError) as e:
        raise WhereError(f"--where {text!r}: {e}") from None
    out = []
    for t in toks:
        if t.type == tokenize.NAME and keyword.iskeyword(t.string) and t.string not in _LOGIC:
            t = t._replace(string=t.string + _KW_SUFFIX)
        out.append(t)
    return tokenize.untokenize(out)


def _name(node: ast.Name) -> str:
    n = node.id
    if n.endswith(_KW_SUFFIX):
        n = n[: -len(_KW_SUFFIX)]
    return n


def _literal(node: ast.AST, text: str):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool)) and node.value is not None:
        return node.value
    if isinstance(node, ast.Name) and node.id in ("true", "false"):
        return node.id == "true"
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) and \
            isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float)) and \
            not isinstance(node.operand.value, bool):
        return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
    raise WhereError(f"--where {text!r}: expected a number, a quoted string or true/false, "
                     f"got {ast.unparse(node)!r}")


def parse_where(text: str, columns) -> tuple[pc.Expression, set[str]]:
    """Compile a filter into an Arrow expression.

    Args:
        text: the filter (see the module docstring).
        columns: the names it may use.

    Returns:
        (expression, the column names it reads).

    Raises:
        WhereError (a ValueError): a syntax the language lacks, or an unknown column
            (the message lists the known ones).
    """
    if not isinstance(text, str) or not text.strip():
        raise WhereError("--where needs a non-empty expression, e.g. \"class == 'scratch' and score_max < 0.5\"")
    if len(text) > MAX_LENGTH:
        raise WhereError(f"--where is {len(text)} characters long; at most {MAX_LENGTH}")
    columns = set(columns)
    src = _rename_keywords(text.strip())
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError as e:
        raise WhereError(f"--where {text!r}: not a valid expression ({e.msg})") from None
    used: set[str] = set()

    def field(node: ast.AST) -> pc.Expression:
        if not isinstance(node, ast.Name) or node.id in ("true", "false"):
            raise WhereError(f"--where {text!r}: expected a column name, got {ast.unparse(node)!r}")
        name = _name(node)
        if name not in columns:
            raise WhereError(f"--where {text!r}: unknown column {name!r}; known: {', '.join(sorted(columns))}")
        used.add(name)
        return pc.field(name)

    def compare(left: ast.AST, op: ast.cmpop, right: ast.AST) -> pc.Expression:
        if isinstance(op, (ast.In, ast.NotIn)):
            if not isinstance(right, (ast.List, ast.Tuple, ast.Set)) or not right.elts:
                raise WhereError(f"--where {text!r}: 'in' needs a non-empty list, e.g. class in ['a', 'b']")
            values = [_literal(e, text) for e in right.elts]
            f = field(left)
            expr = f.isin(pa.array(values))
            if isinstance(op, ast.NotIn):  # a missing value is in no list and outside none
                return pc.if_else(pc.is_valid(f), pc.invert(expr), pa.scalar(None, pa.bool_()))
            return expr
        if type(op) not in _CMP:
            raise WhereError(f"--where {text!r}: operator {type(op).__name__} is not supported "
                             f"(use == != < <= > >= in, not in)")
        fn = getattr(pc, _CMP[type(op)])
        lcol, rcol = _is_column(left), _is_column(right)
        if lcol and not rcol:
            return fn(field(left), pc.scalar(_literal(right, text)))
        if rcol and not lcol:
            return fn(pc.scalar(_literal(left, text)), field(right))
        if lcol and rcol:
            return fn(field(left), field(right))
        raise WhereError(f"--where {text!r}: a comparison needs a column on one side")

    def walk(node: ast.AST) -> pc.Expression:
        if isinstance(node, ast.BoolOp):
            parts = [walk(v) for v in node.values]
            out = parts[0]
            for p in parts[1:]:
                out = pc.and_kleene(out, p) if isinstance(node.op, ast.And) else pc.or_kleene(out, p)
            return out
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return pc.invert(walk(node.operand))
        if isinstance(node, ast.Compare):
            lefts = [node.left, *node.comparators[:-1]]
            parts = [compare(a, op, b) for a, op, b in zip(lefts, node.ops, node.comparators)]
            out = parts[0]
            for p in parts[1:]:
                out = pc.and_kleene(out, p)
            return out
        if isinstance(node, ast.Name) and _name(node) in columns and node.id not in ("true", "false"):
            used.add(_name(node))
            return pc.field(_name(node))  # a boolean column on its own
        raise WhereError(f"--where {text!r}: {ast.unparse(node)!r} is not a comparison "
                         f"(use == != < <= > >= in, not in, and, or, not)")

    try:
        expr = walk(tree.body)
    except (pa.ArrowException, OverflowError) as e:  # e.g. a list mixing strings and numbers
        raise WhereError(f"--where {text!r}: {e}") from None
    return expr, used


def _is_column(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id not in ("true", "false")


def missing_as_null(table: pa.Table) -> pa.Table:
    """NaN in floating columns as null, so that every comparison with a missing value,
    negated ones included (`!=`, `not`), drops the row."""
    for i, f in enumerate(table.schema):
        if pa.types.is_floating(f.type):
            col = table.column(i)
            table = table.set_column(i, f.name, pc.if_else(pc.is_nan(col), pa.scalar(None, f.type), col))
    return table


def filter_table(table: pa.Table, expr: pc.Expression, text: str) -> pa.Table:
    """The rows of `table` where a compiled filter holds; a type mismatch between a column and
    a literal (`class == 1`) or a column that is not a condition is a WhereError."""
    try:
        return missing_as_null(table).filter(expr)  # null -> dropped
    except (pa.ArrowException, TypeError, NotImplementedError) as e:
        raise WhereError(f"--where {text!r}: {e}") from None


def apply_where(table: pa.Table, text: str) -> pa.Table:
    """The rows of `table` where the filter holds (missing values never match)."""
    expr, _ = parse_where(text, table.column_names)
    return filter_table(table, expr, text)


__all__ = ["WhereError", "parse_where", "apply_where", "filter_table", "missing_as_null", "MAX_LENGTH"]
