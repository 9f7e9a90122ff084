"""A calculator tool for multi-turn RL (``rollout.tools: [examples/tools/calculator.py:calculator]``): arithmetic of
numbers, + - * / and parentheses, parsed with ``ast`` (never ``eval``). The README's tool file shows it."""

import ast
import operator

OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def calculator(expression: str) -> float:
    """Evaluate an arithmetic expression of numbers, + - * / and parentheses.

    Args:
        expression: for example "(3 + 4) * 2"
    """
    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"not arithmetic: {ast.unparse(node)}")
    return value(ast.parse(expression, mode="eval").body)
