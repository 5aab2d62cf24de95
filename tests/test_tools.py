"The calculator tool: right answers on arithmetic, refusals on everything else, every call quick."
import random, time
import pytest
from nanochat_lib.tools import (MAX_EXPR_CHARS, MAX_INT_BITS, CalculatorError, calculator, evaluate_expression,
                                format_result)

# Our own expressions, so Python's evaluator is a safe oracle here.
SAFE = ["1+2", "12*37", "7/2", "7//2", "-7//2", "7%3", "-7%3", "7.5%2", "2**10", "2**-2", "(-2)**3", "-2**2",
        "(3+4.5)*-2", "--5", "+5", "-(-(-3))", "100/8*3", "2**0.5", "1_000 + 1", "0x10 * 2", "3.5e2 + 1",
        "((1+2)*(3+4))**2", "10**20", "2**64", "1/3", "0.1+0.2", "1e-5*3", "9**9", "123456789*987654321",
        "72 / 3 * 2 + 5", "(48 - 12) / 4", "15 % 4 + 2 ** 3", "1e15/3", "-0.0", "0", "5 // 0.3", "2**64*2**64"]


@pytest.mark.parametrize("expr", SAFE)
def test_matches_python_on_safe_expressions(expr):
    assert calculator(expr) == format_result(eval(expr))


def test_matches_python_on_random_expressions():
    rng = random.Random(0)
    ops = ["+", "-", "*", "/", "//", "%"]

    def gen(depth):
        if depth == 0 or rng.random() < 0.3:
            return str(rng.randint(0, 999)) if rng.random() < 0.8 else f"{rng.uniform(0, 100):.2f}"
        return f"({gen(depth - 1)} {rng.choice(ops)} {gen(depth - 1)})"

    checked = 0
    for _ in range(500):
        expr = gen(4)
        if len(expr) > MAX_EXPR_CHARS: continue
        try: want = format_result(eval(expr))
        except ZeroDivisionError: want = None
        assert calculator(expr) == want, expr
        checked += 1
    assert checked > 300


def test_thousands_separators_and_whitespace():
    assert calculator("1,234 * 3") == "3702"
    assert calculator("1,234,567 + 1") == "1234568"
    assert calculator("1,2") is None                    # not a thousands separator: a tuple, refused
    assert calculator("  12 * 3\n") == "36"
    assert calculator("'a,b,c'.count(',')") == "2"      # commas inside strings are kept


def test_string_count():
    assert calculator("'strawberry'.count('r')") == "3"
    assert calculator('"mississippi".count("ss")') == "2"
    assert calculator("'strawberry'.count('r') * 2 + 1") == "7"
    assert calculator("'abc'.count('')") == "4"


@pytest.mark.parametrize("value,text", [(2, "2"), (2.0, "2"), (6 / 3, "2"), (-0.0, "0"), (2.5, "2.5"),
                                        (1 / 3, "0.333333333333"), (0.1 + 0.2, "0.3"), (1e20, "1e+20"),
                                        (-7, "-7"), (2 ** 64, "18446744073709551616")])
def test_format_result(value, text):
    assert format_result(value) == text


def test_format_result_rejects_non_numbers():
    for bad in (True, "1", None, 1j):
        with pytest.raises(TypeError): format_result(bad)
    with pytest.raises(ValueError): format_result(float("inf"))


MALICIOUS = [
    "__import__('os').system('echo pwned')",
    "__import__('os')",
    "import os",
    "exec('1')",
    "eval('1+1')",
    "open('/etc/passwd').read()",
    "os.system('ls')",
    "().__class__.__bases__[0].__subclasses__()",
    "().__class__",
    "(1).__class__",
    "'a'.__class__",
    "'abc'.__len__()",
    "'abc'.count.__self__",
    "'abc'.count('a').__class__",
    "''.join(['a'])",
    "'abc'.upper()",
    "'abc'.count(chr(97))",
    "'abc'.count('a', 0, 2)",
    "'abc'.count(sub='a')",
    "'a' * 10**9",
    "'ab' + 'c'",
    "'abc'",
    "x",
    "x + 1",
    "abs(-1)",
    "lambda: 1",
    "(lambda: 1)()",
    "[1, 2][0]",
    "[1, 2]",
    "(1, 2)",
    "{1: 2}",
    "{1}",
    "[i for i in range(3)]",
    "(i for i in range(3))",
    "f'{1+1}'",
    "b'abc'.count(b'a')",
    "1 if 1 else 2",
    "1 < 2",
    "1 and 2",
    "not 1",
    "~1",
    "1 << 10",
    "1 | 2",
    "1 @ 2",
    "(x := 1)",
    "True + 1",
    "None",
    "...",
    "1j",
    "(-8) ** 0.5",
    "9**9**9",
    "10**100000",
    "2**65",
    "(2**60)**9",
    "10**60 * 10**60 * 10**60",
    "9" * 199,
    "1e308 * 10",
    "1e308 ** 2",
    "1/0", "1//0", "1%0", "0**-1", "1.0/0.0",
    "(" * 150 + "1" + ")" * 150,
    "(" * 99 + "1" + ")" * 99 + "+" + "1" * 50,
    "-" * 150 + "1",
    "1+" * 150 + "1",
    "",
    "   ",
    "1 +",
    "1; 2",
    "\x00",
]


@pytest.mark.parametrize("expr", MALICIOUS)
def test_refuses_malicious_and_invalid_expressions(expr):
    t0 = time.perf_counter()
    assert calculator(expr) is None
    assert time.perf_counter() - t0 < 0.5
    with pytest.raises(CalculatorError):
        evaluate_expression(expr)


def test_refusal_reasons_say_why():
    def reason(e):
        with pytest.raises(CalculatorError) as info: evaluate_expression(e)
        return str(info.value)
    assert "exponent" in reason("9**9**9")
    assert "Name" in reason("x + 1")
    assert "Subscript" in reason("[1][0]")
    assert "count" in reason("__import__('os')")
    assert "division by zero" in reason("1/0")
    assert "characters" in reason("1+" * 200)
    assert f"{MAX_INT_BITS} bits" in reason("(2**60)**9")


def test_non_string_input_is_refused():
    for bad in (None, 12, b"1+1", ["1+1"]):
        assert calculator(bad) is None


def test_every_call_returns_within_the_guard():
    slow_candidates = ["9**9**9", "2**64*" * 8 + "1", "1+" * 99 + "1", "(" * 99 + "1" + ")" * 99,
                       "'" + "a" * 180 + "'.count('a')", "-" * 150 + "1", "(2**64)**64", "10**100000"]
    for e in slow_candidates:
        t0 = time.perf_counter()
        calculator(e, timeout_s=0.5)
        assert time.perf_counter() - t0 < 0.5, e


def test_deadline_is_enforced():
    # A deadline already in the past: the walker stops at the first node.
    with pytest.raises(CalculatorError, match="too long"):
        evaluate_expression("1+1", timeout_s=-1)
    assert calculator("1+1", timeout_s=-1) is None
