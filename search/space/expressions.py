"""The bounded expression language of `when:` and `conditions:`: parsed into a whitelisted tree, never eval'ed."""
import ast
import itertools
import operator

from htnet.errors import UserError, first_line

# An expression costs little whatever the file says: its size is bounded at parse time, and every value it
# computes with is small (a power or a repetition is sized before it runs).
MAX_EXPR_CHARS = 1000
MAX_EXPR_NODES = 200
MAX_EXPR_DEPTH = 32
MAX_INT_BITS = 128
MAX_TEXT = 256     # characters of a string value
MAX_ITEMS = 1000   # values in a list or mapping, nested ones included
EXERCISE_COMBINATIONS = 10_000  # value combinations each expression is tried on at load


class _Missing(Exception):
    """A name the expression uses has no value in this configuration."""


class _TooCostly(Exception):
    pass


def _pow(base, exponent):
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and \
            (abs(base).bit_length() - 1) * exponent > MAX_INT_BITS:
        raise _TooCostly(f"integer result over {MAX_INT_BITS} bits")
    return operator.pow(base, exponent)


def _mul(left, right):
    for seq, count in ((left, right), (right, left)):
        if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
            text = isinstance(seq, str)
            if len(seq) * count > (MAX_TEXT if text else MAX_ITEMS):
                raise _TooCostly(f"string result over {MAX_TEXT} characters" if text else
                                 f"{type(seq).__name__} result over {MAX_ITEMS} values")
    return operator.mul(left, right)


def _numeric(op):
    def apply(left, right):  # no string formatting ('%0999999d' % 1), no sequence arithmetic
        if not all(isinstance(v, (int, float)) for v in (left, right)):
            raise TypeError(f"unsupported operand types {type(left).__name__} and {type(right).__name__}")
        return op(left, right)
    return apply


_BINOPS = {ast.Add: operator.add, ast.Sub: _numeric(operator.sub), ast.Mult: _mul,
           ast.Div: _numeric(operator.truediv), ast.FloorDiv: _numeric(operator.floordiv),
           ast.Mod: _numeric(operator.mod), ast.Pow: _numeric(_pow)}
_CMPOPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
           ast.NotIn: lambda a, b: a not in b}
_UNARY = {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCS = {"len": len, "min": min, "max": max, "abs": abs}


def _bounded(value, what="result"):
    """`value`, if it is small enough to compute with; else _TooCostly says why."""
    budget, stack = MAX_ITEMS, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, int) and item.bit_length() > MAX_INT_BITS:
            raise _TooCostly(f"integer {what} over {MAX_INT_BITS} bits")
        if isinstance(item, str) and len(item) > MAX_TEXT:
            raise _TooCostly(f"string {what} over {MAX_TEXT} characters")
        if isinstance(item, (list, tuple, dict)):
            items = list(item.items()) if isinstance(item, dict) else item
            budget -= len(items)
            if budget < 0:
                raise _TooCostly(f"{type(value).__name__} {what} over {MAX_ITEMS} values")
            stack.extend(items)
        elif isinstance(item, complex):
            raise TypeError("complex result")
    return value


def _dotted(node):
    """`model_config.dim` as one name; None for anything else."""
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return base and f"{base}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else None


def short(text, limit=80):
    return repr(text if len(text) <= limit else text[:limit - 3] + "...")


class Expr:
    """An expression over parameter names. Parts made of constants only are evaluated once, at parse time,
    so that `'a' * 10**9` or `1 / 0` stops the file at load."""

    def __init__(self, text, where):
        self.text, self.where = str(text), where
        if len(self.text) > MAX_EXPR_CHARS:
            raise UserError(f"{where}: expression too long ({len(self.text)} characters, limit {MAX_EXPR_CHARS})")
        try:
            self.tree = ast.parse(self.text, mode="eval").body
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            raise UserError(f"{where}: cannot parse expression {short(self.text)}") from None
        stack, count = [(self.tree, 1)], 0
        while stack:
            node, depth = stack.pop()
            count += 1
            if count > MAX_EXPR_NODES or depth > MAX_EXPR_DEPTH:
                limit = f"over {MAX_EXPR_NODES} nodes" if count > MAX_EXPR_NODES else \
                    f"nested over {MAX_EXPR_DEPTH} deep"
                raise UserError(f"{where}: expression too costly ({limit}): {short(self.text)}")
            stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
        self.names = set()
        self._check(self.tree)

    def _check(self, node):
        """Whitelist the node, collect its names, evaluate its constant parts; True if it is constant."""
        name = _dotted(node)
        if name is not None:
            if name in _FUNCS:
                raise UserError(f"{self.where}: {name} is a function: call it, as in {name}(...)")
            self.names.add(name)
            return False
        if isinstance(node, ast.Constant):
            if not (node.value is None or isinstance(node.value, (bool, int, float, str))):
                raise UserError(f"{self.where}: constant {node.value!r} is not allowed in {short(self.text)}")
            self._run(node, {})
            return True
        if isinstance(node, (ast.List, ast.Tuple)):
            children = node.elts
        elif isinstance(node, ast.BoolOp):
            children = node.values
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            children = [node.left, node.right]
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            children = [node.operand]
        elif isinstance(node, ast.Compare) and all(type(op) in _CMPOPS for op in node.ops):
            children = [node.left, *node.comparators]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in _FUNCS and not node.keywords:
            children = node.args
        else:
            raise UserError(f"{self.where}: {type(node).__name__} is not allowed in {short(self.text)}")
        constant = all([self._check(child) for child in children])
        if constant:
            self._run(node, {})
        return constant

    def __call__(self, env):
        return self._run(self.tree, env)

    def _run(self, node, env):
        try:
            return self._eval(node, env)
        except _Missing:
            raise
        except _TooCostly as e:
            raise UserError(f"{self.where}: expression too costly ({e}) in {short(self.text)}") from None
        except (ArithmeticError, TypeError, ValueError, RecursionError, MemoryError) as e:
            raise UserError(f"{self.where}: {short(self.text)} failed: {first_line(e)}") from None

    def _eval(self, node, env):
        name = _dotted(node)
        if name is not None:
            if name not in env:
                raise _Missing(name)
            return _bounded(env[name], f"value of {name}")
        if isinstance(node, ast.Constant):
            return _bounded(node.value, "constant")
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [self._eval(item, env) for item in node.elts]
            return _bounded(items if isinstance(node, ast.List) else tuple(items))
        if isinstance(node, ast.BoolOp):
            values = (self._eval(item, env) for item in node.values)
            return all(values) if isinstance(node.op, ast.And) else any(values)
        if isinstance(node, ast.BinOp):
            return _bounded(_BINOPS[type(node.op)](self._eval(node.left, env), self._eval(node.right, env)))
        if isinstance(node, ast.UnaryOp):
            return _bounded(_UNARY[type(node.op)](self._eval(node.operand, env)))
        if isinstance(node, ast.Compare):
            left = self._eval(node.left, env)
            for op, comparator in zip(node.ops, node.comparators):
                right = self._eval(comparator, env)
                if not _CMPOPS[type(op)](left, right):
                    return False
                left = right
            return True
        return _bounded(_FUNCS[node.func.id](*[self._eval(item, env) for item in node.args]))  # ast.Call

    def holds(self, env, missing=True):
        """The expression's truth; `missing` when a name it uses has no value."""
        try:
            return bool(self(env))
        except _Missing:
            return missing

    def exercise(self, domains):
        """Evaluate on combinations of the values its names can take: one that fails raises its UserError now."""
        names = sorted(self.names & set(domains))
        for combo in itertools.islice(itertools.product(*[domains[n] for n in names]), EXERCISE_COMBINATIONS):
            self.holds(dict(zip(names, combo)))

    def __repr__(self):
        return self.text
