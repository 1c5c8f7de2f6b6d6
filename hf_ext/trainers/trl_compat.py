"""What hf_ext reads from the installed TRL rather than copying: the loss types its GRPO trainer implements.

TRL keeps no public list of its ``loss_type`` values (``trl.GRPOConfig`` accepts any string; an unknown one fails at
the first loss call), so they are read from the source of ``trl.GRPOTrainer._compute_loss``: every string that
``self.loss_type`` is compared with by ``==`` or ``in``. ``tests/test_trl_compat.py`` is the contract test.
"""

import ast
import functools
import inspect
import textwrap

import trl


def loss_type_names(function) -> tuple[str, ...]:
    """Strings compared with ``self.loss_type`` (``==`` / ``in``) in ``function``'s source, in source order."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Compare) and _is_self_loss_type(node.left)):
            continue
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            if not isinstance(op, (ast.Eq, ast.In)):
                continue
            values = comparator.elts if isinstance(comparator, (ast.List, ast.Tuple, ast.Set)) else [comparator]
            found += [(v.lineno, v.col_offset, v.value) for v in values if _is_string(v)]
    return tuple(dict.fromkeys(name for *_, name in sorted(found)))


@functools.cache
def trl_loss_types() -> tuple[str, ...] | None:
    """The loss types of the installed TRL's GRPO trainer, or None where its source cannot be read."""
    try:
        return loss_type_names(trl.GRPOTrainer._compute_loss) or None
    except (OSError, TypeError, SyntaxError):  # no source shipped (zipped or compiled install), or unparsable
        return None


def _is_self_loss_type(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "loss_type"
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    )


def _is_string(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)
