"""The math answer grader: answer extraction, the conventions of its equality, its safety
(model text never evaluated, absurd inputs refused, a hard time limit) and its worker
processes. Cases are written by hand here."""

import builtins
import os
import subprocess
import sys
import time

import pytest

from nanor1 import grader as G


@pytest.mark.parametrize("completion, want", [
    ("<think>2+2 is 4</think><answer>4</answer>", "4"),
    ("<think>maybe <answer>5</answer></think> <answer>4</answer>", "4"),     # only after </think>
    ("<think>x</think><answer>so \\boxed{\\frac{1}{2}}</answer>", "\\frac{1}{2}"),
    ("we get \\boxed{x^{2}+1}. Adding the other two terms then gives \\boxed{7}", "7"),  # the last box
    ("\\boxed{\\frac{a}{\\sqrt{b}}}", "\\frac{a}{\\sqrt{b}}"),             # nested braces
    ("the roots are \\boxed{2} and \\boxed{5}", "\\{2, 5\\}"),               # boxes joined by "and": a set
    ("Natalia sold 48 clips.\n#### 72", "72"),                              # GSM8K
    ("#### 7\nno wait\n#### 9", "9"),
    ("the final answer is 15 gallons * 8 pints = <<15*8=120>>120 pints\n#### 120", "120"),  # GSM8K train:7158
    ("#### Final Answer\nThe answer is 42", "42"),                          # "####" before the marker: a heading
    ("The final answer is 42.\n\n#### Check\n40 + 2 = 42.", "42"),          # "####" with no number: a heading
    ("Final answer: 12\n####", "12"),
    ("\\boxed{12", None),                                                   # unbalanced: no answer
    ("<think>the answer is 4</think>", None),                               # nothing after </think>
    ("<think>still going, 4", None),                                        # never closed
    ("First 3 apples, then 4 more: 7 in all.", "7"),                        # prose: the last number
    ("Final Answer: Ana has 12 apples left after 3 days.", "12"),           # after the marker: the first
    ("so we need $x \\geq 5$ here.", "x \\geq 5"),
    ("Total: 1,234,567 people", "1,234,567"),
    ("-\\frac{3}{4}", "-\\frac{3}{4}"),                                     # a bare answer stays whole
    ("So the answer is 4. Check: 4 + 2 = 6.", "4"),
    ("no numbers at all in this long sentence of plain prose here, none, nothing, zero digits", None),
])
def test_extract_answer(completion, want):
    assert G.extract_answer(completion) == want


@pytest.mark.parametrize("pred, gold", [
    # numbers: separators, signs, decimals, scientific notation
    ("72", "72"), ("1,234", "1234"), ("12 345", "12345"), ("$1,234.50$", "1234.5"), ("-3", "-3.0"),
    (".25", "0.25"), ("3,5", "3.5"), ("1e-05", "0.00001"), ("2.5\\times 10^{3}", "2500"),
    # fractions, roots, pi, degrees
    ("\\frac{1}{2}", "0.5"), ("\\dfrac{3}{4}", "3/4"), ("\\tfrac34", "0.75"), ("\\frac12", "1/2"),
    ("\\frac{6}{8}", "\\frac{3}{4}"), ("2\\sqrt{2}", "\\sqrt{8}"), ("\\sqrt 2", "\\sqrt{2}"),
    ("\\frac{\\pi}{2}", "\\frac12\\pi"), ("45^\\circ", "45"), ("45^{\\circ}", "45°"),
    # percentages: the number or the fraction
    ("50\\%", "50"), ("50%", "0.5"), ("50 percent", "50\\%"),
    # units, text and decoration
    ("12\\text{ cm}", "12"), ("\\$12", "12"), ("12 dollars", "12"), ("\\left(1,2\\right)", "(1,2)"),
    ("\\text{Paris}", "paris"), ("\\text{(B)}", "B"), ("5.", "5"), ("\\mathbf{5}", "5"),
    # x = 5, chains, approximations
    ("x = 5", "5"), ("5", "y=5"), ("f(x) = 3", "3"), ("(a, b) = (1, 2)", "(1, 2)"), ("x = 2+3 = 5", "5"),
    ("x = \\frac13 \\approx 0.33", "1/3"), ("2+3 = 5", "5"), ("3 \\cdot 4 = 12", "12"), ("2+x", "x+2"),
    # algebra
    ("\\frac{x+1}{2}", "\\frac{x}{2}+\\frac12"), ("(x-1)(x+1)", "x^2-1"), ("\\sin^2 x + \\cos^2 x", "1"),
    ("\\ln(e^2)", "2\\ln e"), ("2^{10}", "1024"), ("5!", "120"), ("\\binom{5}{2}", "10"), ("|{-3}|", "3"),
    # equations and inequalities
    ("y = 2x + 1", "2x - y + 1 = 0"), ("x \\ge 3", "3 \\le x"), ("-x > -1", "x < 1"), ("x \\neq 2", "x != 2"),
    ("x \\in [1, 4)", "1 \\le x < 4"), ("x > 3", "(3, \\infty)"),
    # sets, intervals, tuples, ±, matrices
    ("\\{1, 2, 3\\}", "\\{3, 2, 1\\}"), ("\\{1, 2, 2\\}", "\\{2, 1\\}"), ("(1, 2)", "(1,2)"), ("[0, 1)", "[0,1)"),
    ("(0, 1)", "0 < t < 1"), ("(-\\infty, 0] \\cup [1, \\infty)", "(-\\infty,0]\\cup[1,\\infty)"),
    ("1 \\pm \\sqrt{2}", "\\{1-\\sqrt2, 1+\\sqrt2\\}"), ("(1,2), (3,4)", "(3,4), (1,2)"),
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}"),
    ("p = 1, q = 2", "q = 2, p = 1"),
    # whole completions
    ("<think>4</think><answer>\\boxed{6}</answer>", "6"), ("<think>...</think><answer>x = 3</answer>", "3"),
    ("The answer is 308.", "308"), ("the cost is 4 + 3 = 7 dollars", "7"),
    ("1" * 5000, "1" * 5000),                                               # long strings: compared as text
])
def test_math_equal_true(pred, gold):
    assert G.math_equal(pred, gold) is True


@pytest.mark.parametrize("pred, gold", [
    ("73", "72"), ("0.33", "1/3"), ("3.14", "\\pi"), ("1000000001", "1000000000"), ("", "0"), ("1/0", "0"),
    ("-5", "5"), ("2\\sqrt{2}", "\\sqrt{6}"), ("x+1", "x+2"), ("x^2", "y^2"), ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("1, 2, 3", "3, 2, 1"),                                                 # a comma list is ordered
    ("2+3", "5"), ("3 \\cdot 4", "12"), ("76 is equal to 76 + 36.", "112"),  # a computation left undone
    ("\\boxed{(9+1)}", "10"), ("The answer is 76 + 36.", "112"), ("-4 - 6", "-10.0"), ("112", "76 + 36"),
    ("76\\,+\\,36", "112"), ("76~+~36", "112"), ("150 − 38", "112"), ("{76+36}", "112"), ("x = 76+36", "112"),
    ("(76+36)/1", "112"), ("5040+5040", "10{,}080"),
    ("(1, 2)", "(2, 1)"), ("[0, 1)", "[0, 1]"), ("(0, 1)", "[0, 1)"), ("\\{1, 2\\}", "\\{1, 2, 3\\}"),
    ("x < 1", "x > 1"), ("x \\le 1", "x < 1"), ("a + b = 0", "0"), ("7 = 2a", "2a"),
    ("\\text{Paris}", "\\text{London}"), ("ABC2D", "2"), ("32, 349", "32349"),
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&5\\end{pmatrix}"),
    ("<think>\\boxed{5}</think> I am not sure.", "5"),                      # the box was in the thinking
    ("<think>unfinished \\boxed{5}", "5"), (None, "5"), ("5", None),
])
def test_math_equal_false(pred, gold):
    assert G.math_equal(pred, gold) is False


@pytest.mark.parametrize("pred, gold, want", [
    # found in review: each was a wrong verdict once
    ("\\boxed{\\frac{10^{400}}{3}}", "72", False), ("200!", "\\frac13", False),       # huge values are not "inf"
    ("\\frac{1}{2^{40}}", "\\frac{1}{2^{41}}", False), ("10^{-10}", "0", False),       # relative, not absolute
    ("x^{100}", "x^{100}+1", False), ("1000000000.1", "1000000000", False),
    ("|x|", "x", False), ("\\sqrt{x^2}", "x", False), ("\\sqrt{x}\\sqrt{y}", "\\sqrt{xy}", True),  # negative points
    ("\\{1, 2\\}", "(2, 1)", False), ("\\boxed{2} and \\boxed{1}", "(1, 2)", False),  # the reference decides order
    ("2, 1", "\\{1, 2\\}", True), ("1,000", "1", False), ("2,500", "2.5", False),
    ("-x = 5", "x = 5", False), ("x^{-1} = 2", "x = 2", False), ("\\frac{a}{b} = 2", "2", True),
    ("2^10", "1024", True), ("2\\frac{1}{2}", "\\frac52", True), ("\\sin 2x", "\\sin(2x)", True),
    ("\\ln e", "1", True), ("So it is 5.", "5", True), ("\\boxed{\\boxed{5}}", "5", True),
    ("\\boxed{3}. Wait, let me recheck. \\boxed{4}", "4", True),
    # MATH-500's gold solutions: one answer boxed in two forms (number_theory/459)
    ("$\\boxed{15\\frac{39}{40}},$ or $\\boxed{\\frac{639}{40}}$", "\\frac{639}{40}", True),
    ("\\{2\\frac{1}{2}\\}", "\\{\\frac{5}{2}\\}", True), ("\\boxed{3} or \\boxed{3.0}", "3", True),
    ("\\boxed{3} or \\boxed{4}", "3", False), ("\\{3\\}", "3", False),        # two answers; a set of one
    # numbers that are not computations left undone
    ("(12)", "12", True), ("-(3)", "-3", True), ("12.", "12", True), ("1e5", "100000", True), ("224/2", "112", True),
    ("2^3", "8", True), ("76+36=112", "112", True),
])
def test_math_equal_review_cases(pred, gold, want):
    assert G.math_equal(pred, gold) is want


def test_odd_text_never_raises():
    for text in ["{abc", "{", "_", "}{", "\\boxed{" * 50, "$$$$", "\\frac{", "^^", "x_", "\\sqrt[", "\\begin{pmatrix}"]:
        G.extract_answer(text)
        assert G._check(text, "1") is False


@pytest.mark.parametrize("pred", [
    "__import__('os').system('touch pwned')",
    "Matrix(open('pwned', 'w').write('x') and [[1]])",
    "\\boxed{__import__('os').system('touch pwned')}",
    "exec(\"open('pwned','w')\")", "lambda: open('pwned', 'w')",
])
def test_injection_is_never_run(pred, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the worker starts here: a created file would land in tmp_path
    for proc in G._idle_workers:
        proc.kill()
    G._idle_workers.clear()
    assert G.math_equal(pred, "2") is False
    assert G.math_equal(pred, "\\begin{pmatrix}1\\end{pmatrix}") is False
    assert os.listdir(tmp_path) == []


def test_the_checker_never_calls_eval_exec_or_sympify(monkeypatch):
    """Run the whole comparison in this process with eval, exec and sympy's string parsers
    booby-trapped: every case still gets its verdict, so none of them is ever reached."""
    import sympy
    import sympy.parsing.sympy_parser as sp
    G._sympy()  # the import itself may use them; comparisons may not

    def trap(*a, **k):
        raise AssertionError("model text reached an evaluator")

    def string_trap(real):  # imports run code objects through exec: only strings are trapped
        return lambda src, *a, **k: trap() if isinstance(src, str) else real(src, *a, **k)
    monkeypatch.setattr(builtins, "eval", string_trap(builtins.eval))
    monkeypatch.setattr(builtins, "exec", string_trap(builtins.exec))
    monkeypatch.setattr(sp, "parse_expr", trap)
    monkeypatch.setattr(sympy, "parse_expr", trap)
    monkeypatch.setattr(sympy, "sympify", lambda a, *r, **k: trap() if isinstance(a, str) else sympy.core.sympify.sympify(a, *r, **k))
    cases = [("2\\sqrt{2}", "\\sqrt{8}", True), ("\\frac{x+1}{2}", "\\frac{x}{2}+\\frac12", True),
             ("x \\in [1, 4)", "1 \\le x < 4", True), ("__import__('os')", "0", False), ("(1,2),(3,4)", "(3,4),(1,2)", True)]
    for pred, gold, want in cases:
        assert G._check(pred, gold) is want


@pytest.mark.parametrize("pred", [
    "10^{10^{10}}", "10**10**10", "9^{9^{9^{9}}}", "2^{-100000}", "1000!", "\\binom{100000}{50000}",
    "1" * 200 + "+1", "(" * 2000 + "1" + ")" * 2000, "(10^{-99})^{999999}", "x^{10^{99}}", "\\binom{x}{1000000}",
    "\\boxed{" * 4000,
])
def test_absurd_inputs_are_refused_quickly(pred):
    t = time.time()
    assert G.math_equal(pred, "2") is False
    assert time.time() - t < 2.5  # refused before computing, well inside the worker's time limit


def test_a_check_past_the_time_limit_kills_the_worker_and_the_next_check_works():
    G.math_equal("1/2", "1/2")  # a warm worker (two integers would skip it)
    (proc,) = G._idle_workers[-1:]
    t = time.time()
    # passes every guard, but comparing means expanding two polynomials of ~5e8 terms
    assert G.math_equal("f(x)(w+x+y+z+1)^{300}", "f(x)(w+x+y+z+2)^{300}", timeout=0.5) is False
    assert time.time() - t < 2.0
    assert proc.wait(timeout=5) is not None and proc not in G._idle_workers  # killed, not reused
    assert G.math_equal("\\frac{2}{4}", "0.5") is True


def test_a_dead_worker_is_replaced_and_workers_die_with_their_parent(tmp_path):
    G.math_equal("1/2", "1/2")  # not two integers, which skip the worker
    for proc in G._idle_workers:
        proc.kill()
        proc.wait()
    assert G.math_equal("\\frac{1}{2}", "0.5") is True  # the dead one is noticed and replaced
    script = tmp_path / "parent.py"
    script.write_text(
        "import os, sys, threading, time\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(G.__file__)))!r})\n"
        "from nanor1 import grader as G\n"
        "G.math_equal('1/2', '1/2')\n"
        "print(G._idle_workers[0].pid, flush=True)\n"
        "slow = 'f(x)(w+x+y+z+1)^{300}'\n"
        "threading.Thread(target=G.math_equal, args=(slow, slow.replace('1)', '2)'), 60)).start()\n"
        "time.sleep(0.5)\n"
        "os._exit(0)\n")  # the parent dies while its worker is busy
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    pid = int(out.stdout.split()[0])
    deadline = time.time() + 10
    while os.path.exists(f"/proc/{pid}") and time.time() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_integer_answers_skip_the_worker_and_agree_with_it(monkeypatch):
    cases = [("7", "7"), ("07", "7"), (" -3 ", "-3"), ("12", "-12"), ("0", "-0"),
             ("<think>7+5=12 (0).</think> <answer>2</answer>", "2"),
             ("<think>x</think>\n<answer> 12 </answer>\n", "012"),
             ("<think>x</think> <answer>13</answer>", "12"),
             ("9" * 100, "9" * 100)]
    expected = [G._check(p, g) for p, g in cases]  # the worker's own comparison, run here
    assert expected == [True, True, True, False, True, True, True, False, True]

    def no_worker():
        raise AssertionError("an integer comparison started the math worker")

    monkeypatch.setattr(G, "_start_math_worker", no_worker)
    monkeypatch.setattr(G, "_idle_workers", [])
    assert [G.math_equal(p, g) for p, g in cases] == expected
    # anything else still goes to the worker: a decimal, a comma, text after the answer, 101
    # digits, a plus sign, digits of another script
    for pred, gold in [("7.0", "7"), ("1,000", "1000"), ("<think>x</think> <answer>7</answer> ok", "7"),
                       ("7", "7.0"), ("1" * 101, "1" * 101), ("+5", "5"), ("\u0663", "3")]:
        with pytest.raises(AssertionError, match="started the math worker"):
            G.math_equal(pred, gold)
