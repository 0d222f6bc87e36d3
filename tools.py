"""Tools a chat model may call (model_sample.py --tools tools.py, ddp_grpo.py --tools tools.py): plain Python
functions with type hints and a docstring whose Args section describes each parameter, from which their JSON
schema is made (transformers.utils.get_json_schema, as apply_chat_template(tools=[function]) does). Write your
own file the same way: every public function defined in it is a tool. A tool returns text (anything else is
shown as JSON); an exception it raises is shown to the model as the error text. Every prompt lists the schemas,
so a short description leaves a small model's context to the conversation.
"""
from __future__ import annotations

import ast
import math
import operator

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_SIGNS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculator(expression: str) -> str:
    """Evaluate + - * / and parentheses on numbers.

    Args:
        expression: e.g. 37+48
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    value = _evaluate(tree.body)
    if not math.isfinite(value):
        raise ValueError(f"{expression!r} is too large to compute")
    return str(int(value)) if value == int(value) else f"{value:.10g}"


def _evaluate(node: ast.AST) -> float:
    """The value of a parsed expression made only of numbers, + - * / and parentheses (no names, no calls:
    nothing that eval would run is accepted)."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _SIGNS:
        return _SIGNS[type(node.op)](_evaluate(node.operand))
    raise ValueError(f"only numbers, + - * / and parentheses are allowed, not {ast.unparse(node)!r}")
