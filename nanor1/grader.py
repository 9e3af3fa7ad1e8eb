"""The math answer grader: does a completion's final answer equal the reference?

math_equal(pred, gold) is what the accuracy reward (rewards.py) and the majority vote of
reject_sample.py call. It works in four steps, each under its own header below:
1. extract the final answer from the completion (the <answer> block, the last \\boxed{},
   "the answer is", GSM8K's "#### n", ...), with regular expressions only;
2. parse both answers with our own small LaTeX grammar into sympy objects;
3. compare them under the conventions listed at step 3 (numbers exactly, lists in order,
   sets without, equations up to a factor, expressions at fixed points, ...);
4. run every comparison but one of two plain integers in a worker process that is
   killed past a time limit.

Model text is hostile input: nothing a model writes reaches eval, exec, sympify or
parse_expr; every sympy object is built by this code from tokens it recognised. This file
imports only the standard library (sympy is imported in the worker), so the worker runs
it as a script: python -I grader.py --math-worker.

Deliberate simplification: a comma list is ordered (see the conventions at step 3).
"""

import json
import os
import re
import selectors
import subprocess
import sys
import threading
import time

# ----------------------------------------------------------------------------------------
# math answers, step 1: find the final answer in a completion (pure regex, runs anywhere)

THINK_END = "</think>"


def find_boxes(text):
    r"""[(start, end, content)] of every outermost \boxed{...} / \fbox{...}, nested braces
    allowed, in one pass. An unbalanced box is skipped rather than guessed."""
    out, stack, open_boxes, i = [], [], 0, 0  # stack: for each open brace, where its box began (or None)
    while i < len(text):
        m = BOX_OPEN.match(text, i) if text[i] == "\\" else None
        if m:
            stack.append(m.start())
            open_boxes += 1
            i = m.end()
            continue
        if text[i] == "{":
            stack.append(None)
        elif text[i] == "}" and stack:
            start = stack.pop()
            if start is not None:
                open_boxes -= 1
                if open_boxes == 0:  # an outermost box
                    out.append((start, i + 1, text[BOX_OPEN.match(text, start).end():i]))
        i += 1
    return out


BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")


# Several answers boxed (or typeset) one after the other are one list answer when only a
# connector stands between them: "\boxed{1} and \boxed{2}", "$21,16$ or $11$".
def _joins(gap):
    gap = re.sub(r"\\(?:text|mbox|textnormal)\s*\{([^{}]*)\}", r"\1", gap)
    gap = re.sub(r"\\q?quad|\\[,;:! ]|\\[()\[\]]|\$", " ", gap).strip()
    words = [w for w in re.findall(r"[A-Za-z]+", gap) if w not in ("and", "or")]
    if len(gap) > 32 or len(words) > 3 or re.search(r"[.!?](\s|$)", gap):
        return False  # "\boxed{3}. Wait, let me recheck. \boxed{4}": a correction, not a list
    return not words or bool(re.search(r"(^|\W)(and|or)(\W|$)|[,;和或]", gap))


def _tail_run(spans, text):
    """Contents of the last span and of the spans before it that only connectors separate."""
    run = [spans[-1]]
    for prev in reversed(spans[:-1]):
        if not _joins(text[prev[1]:run[0][0]]):
            break
        run.insert(0, prev)
    if len(run) == 1:
        return run[0][2]
    return r"\{" + ", ".join(s[2] for s in run) + r"\}"  # separate answers: a set


MATH_BLOCK = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
# a number, or numbers joined by arithmetic ("100 - 30 = 70"), as it appears in prose
NUM_SPAN = re.compile(r"(?<![A-Za-z_\d.])\(?[-+]?\d[\d,.]*(?:\s*(?:[-+*/×÷=]|\\times|\\cdot)\s*\(?-?\d[\d,.]*\)?)*%?"
                      r"|\\[dt]?frac\{[^{}]*\}\{[^{}]*\}|\\sqrt\{[^{}]*\}")
FINAL_MARK = re.compile(r"final answer(?: is)?\s*:?|final result is", re.IGNORECASE)
ANSWER_MARK = re.compile(r"\banswer(?: is|:)|\bréponse(?: est|\s*:)|\brespuesta(?: es|\s*:)|\bantwort(?: ist|\s*:)|答案[是为：:]?",
                         re.IGNORECASE)


def _candidates(text):
    """Answer-like spans of prose, in order: $...$ blocks that hold a number or an
    operator, and numbers or little computations outside them."""
    spans, blanked = [], text
    for m in MATH_BLOCK.finditer(text):
        body = next(g for g in m.groups() if g is not None)
        if re.search(r"[\d=<>\\]", body) and _looks_bare(body):
            spans.append((m.start(), m.end(), body, True))
            blanked = blanked[:m.start()] + " " * (m.end() - m.start()) + blanked[m.end():]
    for m in NUM_SPAN.finditer(blanked):
        body = m.group(0).strip().rstrip(".,")
        if body.count("(") != body.count(")"):
            body = body.strip("()")
        spans.append((m.start(), m.end(), body, False))
    return sorted(spans)


def extract_answer(completion):
    r"""The final answer of a completion, or None. In order: the last <answer> block, the
    last \boxed{} (with boxes joined to it by "and"/","), a whole answer that is already
    bare math, the first thing after "Final Answer", GSM8K's "#### n", the first thing
    after "the answer is", and else the last number or $...$ block. Only text after the
    last </think> counts: answers tried while thinking are not the answer."""
    if completion is None:
        return None
    text = completion
    if THINK_END in text:
        text = text.rsplit(THINK_END, 1)[1]
    elif "<think>" in text:
        return None  # still thinking: no answer yet
    text = re.sub(r"(?<!\\)\\\\(?=[A-Za-z])", r"\\", text)  # \\frac: stored with doubled backslashes
    text = text.replace("\\$", " ")  # an escaped dollar is a currency sign, not math
    blocks = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
    if blocks:
        text = blocks[-1]
    boxes = find_boxes(text)
    final = list(FINAL_MARK.finditer(text))
    if re.search(r"\\(?:boxed|fbox)\s*\{", text[boxes[-1][1] if boxes else 0:]):
        return None  # the last box never closes: the answer was cut off
    if boxes and not (final and final[-1].start() > boxes[-1][1]):  # "Final Answer:" after the boxes wins
        return _tail_run(boxes, text).strip()
    bare = text.strip().strip("$").strip()
    if bare and _looks_bare(bare):
        return bare
    first = False
    # GSM8K's "#### 72": the last one, unless a "final answer" comes after it ("#### Final
    # Answer" is a heading), and only when a number follows it (not "#### Check")
    tail = text[final[-1].end():] if final else text
    gsm8k = tail.rsplit("####", 1)[1].strip().split("\n")[0].strip().rstrip(".") if "####" in tail else ""
    if re.match(r"[-$\\(]?\d", gsm8k):
        return gsm8k
    for mark in (FINAL_MARK, ANSWER_MARK):  # the first thing after the last marker
        found = list(mark.finditer(text))
        if found:
            text, first = text[found[-1].end():], True
            break
    spans = _candidates(text)
    if spans:
        if first:
            return spans[0][2]
        blocks = [s for s in spans if s[3]]
        if blocks and blocks[-1] == spans[-1]:
            return _tail_run(blocks, text)
        return spans[-1][2]
    text = text.strip().strip("$.").strip()
    return text if 0 < len(text) <= 64 else None  # a short word answer ("odd", "Evelyn")


# ----------------------------------------------------------------------------------------
# math answers, step 2: our own parser from LaTeX to sympy, over a whitelisted grammar.
# Model text is never given to eval, exec, sympify or parse_expr: every sympy object below
# is built by this code from tokens it recognised. Anything else is "not math" and falls
# back to comparing normalised strings.

MAX_ANSWER_CHARS = 1000   # longer answers are compared as strings, never parsed
MAX_DIGITS = 100          # integer literals longer than this are refused
MAX_RESULT_DIGITS = 1000  # a power or factorial whose value would be longer is refused
MAX_ITEMS = 64            # elements of a list, set or matrix
MAX_EXPONENT = 10_000     # larger exponents are refused, even on a variable


class NotMath(ValueError):
    """The text is not (or not safely) parsable as a math answer."""


UNICODE = {"≤": r"\le ", "≥": r"\ge ", "≠": r"\ne ", "×": r"\times ", "÷": r"\div ", "·": r"\cdot ",
           "−": "-", "π": r"\pi ", "√": r"\sqrt", "∞": r"\infty ", "∪": r"\cup ", "∈": r"\in ",
           "±": r"\pm ", "²": "^2", "³": "^3", "≈": r"\approx ", "°": "", "，": ",", "；": ";"}
RELATIONS = {"=": "=", "<": "<", ">": ">", "<=": "<=", ">=": ">=", "!=": "!=", r"\le": "<=", r"\leq": "<=",
             r"\leqslant": "<=", r"\ge": ">=", r"\geq": ">=", r"\geqslant": ">=", r"\lt": "<", r"\gt": ">",
             r"\ne": "!=", r"\neq": "!=", r"\approx": "~", r"\in": "in", r"\equiv": "="}
FUNCTIONS = {"sin", "cos", "tan", "sec", "csc", "cot", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
             "ln", "log", "exp"}
UNITS = {"cm", "mm", "km", "kg", "mg", "ml", "mph", "min", "hour", "hours", "minutes", "seconds", "meter",
         "meters", "metres", "mile", "miles", "feet", "foot", "inch", "inches", "unit", "units", "degree",
         "degrees", "dollar", "dollars", "cents", "yuan"}
TEXT_CMDS = {r"\text", r"\textbf", r"\textit", r"\textnormal", r"\mbox", r"\mathrm", r"\mathbf", r"\mathit",
             r"\operatorname", r"\mathsf", r"\rm", r"\overline", r"\vec", r"\hat", r"\bar", r"\mathbb"}
FUNC_LETTERS = set("fghFGHPQW")
SHORT_WORDS = {"is", "it", "so", "of", "to", "be", "we", "in", "on", "at", "an", "as", "by", "if", "no", "do",
               "my", "me", "he", "up", "us"}  # a letter that reads as a function before "(": f(x), P(x)


def clean(s):
    r"""Strip the typesetting that does not change a value: $, \left/\right, spacing,
    \dfrac, degrees, percent and dollar signs, "and" between answers."""
    for k, v in UNICODE.items():
        s = s.replace(k, v)
    s = re.sub(r",\\!\s*", ",", s.replace("$", " ")).replace("{,}", "")
    s = re.sub(r"\\(?:left|right)\.", "", s)  # invisible delimiters
    s = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big|displaystyle)(?![A-Za-z])", "", s)
    s = re.sub(r"\\begin\{array\}\{[^{}]*\}|\\begin\{[pbvBV]?matrix\}", r"\\matbegin ", s)
    s = re.sub(r"\\end\{(?:array|[pbvBV]?matrix)\}", r"\\matend ", s)
    s = re.sub(r"(?<![\w.])(\d+(?:\.\d+)?)[eE]([-+]?\d+)(?![\w.])", r"\1\\times 10^{\2}", s)  # 1e-05
    s = re.sub(r"\\[dtc]frac(?![A-Za-z])", r"\\frac", s).replace(r"\dbinom", r"\binom")
    # 2\frac12 = 5/2, also first in a set: \{2\frac12\}
    s = re.sub(r"(?:(?<=\\\{)|(?<![\w.}^_{]))(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}", r"(\1+\\frac{\2}{\3})", s)
    s = re.sub(r"\\(?:boxed|fbox)\s*\{", "{", s)  # a box inside the answer is only braces
    s = re.sub(r"\\q?quad|(?<!\\)\\[,;:! ]|~", " ", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree", "", s)
    s = re.sub(r"(\\%|%|\bpercentage\b|\bpercent\b|\bpct\b)", "%", s)
    s = re.sub(r"\\(?:text|mbox|textnormal)\s*\{\s*(and|or)\s*\}|(?<![A-Za-z])(and|or)(?![a-z])", ",", s)
    s = re.sub(r"\\(?:text|mbox)\s*\{\s*\}", "", s)
    return s.strip().rstrip(".").strip()


TOKEN = re.compile(r"(?P<num>\d+(?:\.\d+)?|\.\d+)|(?P<cmd>\\[A-Za-z]+|\\[{}|]|\\\\)|(?P<word>[A-Za-z]+)"
                   r"|(?P<op><=|>=|!=|[-+*/^_=<>(),;:\[\]{}|!&%'])|(?P<space>\s+)")


def tokenize(s):
    """-> [(kind, text, space_before)]; the arguments of text commands become one token."""
    toks, i, space = [], 0, False
    while i < len(s):
        m = TOKEN.match(s, i)
        if not m:
            raise NotMath(f"unexpected character {s[i]!r}")
        kind, text, i = m.lastgroup, m.group(0), m.end()
        if kind == "space":
            space = True
            continue
        if kind == "cmd" and text in TEXT_CMDS:
            j = s.find("{", i)
            if j < 0 or s[i:j].strip():
                raise NotMath(f"{text} without an argument")
            depth, k = 0, j
            for k in range(j, len(s)):
                depth += {"{": 1, "}": -1}.get(s[k], 0)
                if depth == 0:
                    break
            if depth:
                raise NotMath("unbalanced braces")
            kind, text, i = "text", s[j + 1:k].strip(), k + 1
        elif kind == "word":
            if text.lower() in UNITS and toks and toks[-1][0] in ("num", "op") and toks[-1][1] not in "(,;":
                space = True
                continue  # "125 miles": the unit is not part of the value
            if text.lower() in SHORT_WORDS and not text.isupper():
                raise NotMath(f"the word {text!r}")  # "So it is 5": prose, not x times y
            if text in FUNCTIONS:
                kind, text = "cmd", "\\" + text
            elif toks and (toks[-1][1] == "_" or toks[-1][1] == "{" and len(toks) > 1 and toks[-2][1] == "_"):
                kind = "name"  # a subscript: S_{MBCN}
            elif len(text) >= 3:
                raise NotMath(f"the word {text!r}")  # prose, not math
            else:  # "xy" is x times y
                toks += [("name", c, space and n == 0) for n, c in enumerate(text)]
                space = False
                continue
        toks.append((kind, text, space))
        space = False
    return toks


def _sympy():
    import sympy  # imported on first use, in the worker process
    return sympy


def _letter(c):
    """A one-letter name: e is Euler's number, every other letter a variable."""
    S = _sympy()
    return S.E if c == "e" else S.Symbol(c)


class Parser:
    """Recursive descent over the tokens; every method returns a value:
    ("expr", sympy expression or Matrix), ("text", str), ("list", [values], ordered),
    ("tuple", [values], bracket), ("interval", lo, hi, lo_closed, hi_closed),
    ("set", [values]), ("union", [values]), ("rel", [ops], [values])."""

    def __init__(self, tokens):
        self.t, self.i, self.S = tokens, 0, _sympy()

    def peek(self, k=0):
        return self.t[self.i + k] if self.i + k < len(self.t) else ("end", "", False)

    def take(self, text=None):
        tok = self.peek()
        if tok[0] == "end" or (text is not None and tok[1] != text):
            raise NotMath(f"expected {text!r}, got {tok[1]!r}")
        self.i += 1
        return tok

    def at(self, *texts):
        return self.peek()[1] in texts and self.peek()[0] != "text"

    # lists and relations -----------------------------------------------------------------
    def answer(self):
        groups = [self.items(closers=("end",), top=True)]
        while self.at(";"):
            self.take()
            groups.append(self.items(closers=("end",), top=True))
        if self.peek()[0] != "end":
            raise NotMath(f"unexpected {self.peek()[1]!r}")
        if len(groups) == 1:
            return groups[0][0] if len(groups[0]) == 1 else ("list", groups[0], True)
        return ("list", [g[0] if len(g) == 1 else ("list", g, True) for g in groups], True)

    def items(self, closers, top=False):
        out = [self.relation()]
        while self.at(",") or (self.at(";") and not top):
            self.take()
            if self.peek()[1] in closers or self.peek()[0] == "end":
                break  # a trailing comma
            out.append(self.relation())
            if len(out) > MAX_ITEMS:
                raise NotMath("too many items")
        return out

    def relation(self):
        parts, ops = [self.union()], []
        while self.peek()[1] in RELATIONS and self.peek()[0] in ("op", "cmd"):
            ops.append(RELATIONS[self.take()[1]])
            parts.append(self.union())
        return ("rel", ops, parts) if ops else parts[0]

    def union(self):
        parts = [self.ratio()]
        while self.at(r"\cup"):
            self.take()
            parts.append(self.ratio())
        return ("union", parts) if len(parts) > 1 else parts[0]

    def ratio(self):
        parts = [self.sum()]
        while self.at(":"):
            self.take()
            parts.append(self.sum())
        return ("tuple", parts, ":") if len(parts) > 1 else parts[0]

    # arithmetic ----------------------------------------------------------------------------
    def sum(self):
        S, sign = self.S, 1
        if self.at("+", "-", r"\pm"):
            sign = {"+": 1, "-": -1, r"\pm": S.Symbol("PLUSMINUS")}[self.take()[1]]
        first = self.term()
        if first[0] != "expr":
            if sign != 1:
                raise NotMath("minus a non-number")
            return first
        total = sign * first[1]
        while self.at("+", "-", r"\pm", r"\mp"):
            op = self.take()[1]
            value = self.expr(self.term())
            pm = S.Symbol("PLUSMINUS")  # a ± b is both values: expanded into a set later
            total = total + {"+": value, "-": -value, r"\pm": pm * value, r"\mp": -pm * value}[op]
        return ("expr", total)

    def term(self):
        value = self.power()
        while True:
            tok = self.peek()
            if tok[0] == "text":  # "5 \text{ cm}": a unit after a value
                self.take()
                if self.at("^"):
                    self.take()
                    self.atom()
                continue
            if tok[1] == "%" and tok[0] == "op":
                self.take()
                value = ("percent", self.expr(value))
                continue
            if tok[1] in ("*", "/", r"\cdot", r"\times", r"\div") and tok[0] in ("op", "cmd"):
                self.take()
                rhs = self.expr(self.power())
                value = ("expr", self.expr(value) / rhs if tok[1] in ("/", r"\div") else self.expr(value) * rhs)
            elif self.starts_atom(tok):
                value = ("expr", self.expr(value) * self.expr(self.power()))  # implicit product
            else:
                return value

    def starts_atom(self, tok):
        kind, text, _ = tok
        return (kind in ("num", "name") or (kind == "cmd" and text not in RELATIONS and text not in
                (r"\cup", r"\pm", r"\mp", r"\cdot", r"\times", r"\div", "\\\\", r"\matend", r"\}", r"\rangle", r"\rfloor", r"\rceil")))\
            or (kind == "op" and text in "(")

    def power(self):
        base = self.atom()
        while self.at("^", "!"):
            if self.take()[1] == "!":
                n = self.expr(base)
                if not (n.is_Integer and 0 <= n <= 300):
                    raise NotMath("factorial too large")
                base = ("expr", self.S.factorial(n))
                continue
            exp = self.expr(self.arg(signed=True, whole=True))
            base = ("expr", self.guarded_pow(self.expr(base), exp))
        return base

    def guarded_pow(self, b, e):
        """b**e, refusing before computing when the value would have thousands of digits."""
        S = self.S
        if e.is_number and e.is_real and abs(e) > 1:
            if abs(e) > MAX_EXPONENT:
                raise NotMath("exponent too large")
            if b.is_number and b != 0 and abs(e) * abs(S.log(abs(S.N(b, 15)), 10)) > MAX_RESULT_DIGITS:
                raise NotMath("power too large")
        return b ** e

    def expr(self, value):
        if value[0] == "percent":
            return value[1]
        if value[0] != "expr":
            raise NotMath("arithmetic on a non-number")
        return value[1]

    # atoms ---------------------------------------------------------------------------------
    def arg(self, signed=False, whole=False):
        r"""One argument of \frac, ^, \sqrt: a {group}, or a single character as in \frac12."""
        kind, text, _ = self.peek()
        if text == "{" and kind == "op":
            self.take()
            value = self.answer_until("}")
            return value
        if kind == "num" and len(text) > 1 and "." not in text and not whole:  # whole: 2^10 is 1024
            self.t[self.i] = ("num", text[1:], False)  # \frac94: 9 now, 4 left for the next
            return ("expr", self.S.Integer(text[0]))
        if signed and self.at("-", "+"):
            sign = -1 if self.take()[1] == "-" else 1
            return ("expr", sign * self.expr(self.atom()))
        return self.atom()

    def answer_until(self, closer):
        values = self.items(closers=(closer,))
        self.take(closer)
        return values[0] if len(values) == 1 else ("list", values, True)

    def atom(self):
        S = self.S
        kind, text, _ = tok = self.take()
        if kind == "num":
            if len(text) > MAX_DIGITS:
                raise NotMath("number too long")
            if len(text.partition(".")[2]) > 6:  # 0.0833333333: a rounded value, not an exact one
                return ("expr", S.Float(text, 40))
            return ("expr", S.Rational(text))
        if kind == "text":
            if re.fullmatch(r"[A-Za-z]", text):
                return ("expr", _letter(text))  # \mathrm{e}, \mathbf{v}
            return ("text", text)
        if kind == "name":
            return self.name(text, tok)
        if text == "(" or text == "[":
            values = self.items(closers=(")", "]"))
            close = self.take()[1]
            if len(values) == 1 and close == {"(": ")", "[": "]"}[text]:
                return values[0]  # grouping
            if len(values) == 2 and (text == "[" or close == "]"):
                return ("interval", self.expr(values[0]), self.expr(values[1]), text == "[", close == "]")
            return ("tuple", values, text)
        if text == "{":
            values = self.items(closers=("}",))
            self.take("}")
            return values[0] if len(values) == 1 else ("list", values, True)
        if text in (r"\{", r"\langle"):
            close = {r"\{": r"\}", r"\langle": r"\rangle"}[text]
            if self.at(close):
                self.take()
                return ("set", [])
            values = self.items(closers=(close,))
            self.take(close)
            return ("set", values) if text == r"\{" else ("tuple", values, "(")
        if text == "|":
            inner = self.expr(self.sum())
            self.take("|")
            return ("expr", S.Abs(inner))
        if text == r"\frac":
            num, den = self.expr(self.arg()), self.expr(self.arg())
            if den == 0:
                raise NotMath("division by zero")
            return ("expr", num / den)
        if text == r"\binom":
            n, k = self.expr(self.arg()), self.expr(self.arg())
            if (n.is_number and abs(n) > 3000) or (k.is_number and abs(k) > 3000):
                raise NotMath("binomial too large")  # C(3000, 1500) has ~900 digits
            return ("expr", S.binomial(n, k))
        if text == r"\sqrt":
            index = 2
            if self.at("["):
                self.take()
                index = self.expr(self.sum())
                self.take("]")
            return ("expr", S.root(self.expr(self.arg()), index))
        if text[1:] in FUNCTIONS:
            return self.function(text[1:])
        if text in (r"\lfloor", r"\lceil"):
            inner = self.expr(self.sum())
            self.take(r"\rfloor" if text == r"\lfloor" else r"\rceil")
            return ("expr", S.floor(inner) if text == r"\lfloor" else S.ceiling(inner))
        if text in (r"\pi", r"\infty", r"\emptyset", r"\varnothing"):
            return {r"\pi": ("expr", S.pi), r"\infty": ("expr", S.oo)}.get(text, ("set", []))
        if text == r"\matbegin":
            return self.matrix()
        if text == r"\sum":
            return self.big_sum()
        greek = text[1:]
        if greek in GREEK:
            return self.name(greek, tok)
        raise NotMath(f"unsupported {text!r}")

    def name(self, letter, tok):
        S = self.S
        if self.at("_"):  # x_1, a_{37}: one symbol; F_{n-1}: a function of the subscript
            self.take()
            sub = self.raw_arg()
            if re.fullmatch(r"[A-Za-z0-9]+", sub):
                return ("expr", S.Symbol(f"{letter}_{sub}"))
            return ("expr", S.Function(f"{letter}_")(self.expr(Parser(tokenize(sub)).answer())))
        if letter in FUNC_LETTERS and self.at("(") and not self.peek()[2]:
            self.take()
            args = self.items(closers=(")",))
            self.take(")")
            return ("expr", S.Function(letter)(*[self.expr(a) for a in args]))
        return ("expr", _letter(letter))

    def raw_arg(self):
        """The source text of a subscript, to name a symbol like a_{37}."""
        if self.at("{"):
            self.take()
            depth, parts = 1, []
            while True:
                kind, text, _ = self.take()
                depth += {"{": 1, "}": -1}.get(text, 0) if kind == "op" else 0
                if depth == 0:
                    return "".join(parts)
                parts.append(text)
        kind, text, _ = self.take()
        if kind == "num" and len(text) > 1:  # x_12 is x_1 times 2, as in LaTeX
            self.i -= 1
            self.t[self.i] = ("num", text[1:], False)
            return text[0]
        return text

    def function(self, name):
        S = self.S
        power, base = None, None
        if self.at("^"):  # \sin^2 x
            self.take()
            power = self.expr(self.arg(signed=True))
        if name == "log" and self.at("_"):
            self.take()
            base = self.expr(self.arg())
        if self.at("("):
            self.take()
            inner = self.expr(self.sum())
            self.take(")")
        else:  # \sin 2x: the argument runs over the numbers and letters that follow
            inner = self.expr(self.power())
            while self.peek()[0] in ("num", "name"):
                inner = inner * self.expr(self.power())
        f = {"ln": S.log, "arcsin": S.asin, "arccos": S.acos, "arctan": S.atan}.get(name) or getattr(S, name)
        value = S.log(inner, base) if base is not None else f(inner)
        return ("expr", value ** power if power is not None else value)

    def matrix(self):
        rows, row = [], []
        while not self.at(r"\matend"):
            row.append(self.expr(self.sum()))
            if self.at("&"):
                self.take()
            elif self.at("\\\\"):
                self.take()
                rows.append(row)
                row = []
            elif not self.at(r"\matend"):
                raise NotMath("bad matrix")
            if sum(map(len, rows)) > MAX_ITEMS:
                raise NotMath("matrix too large")
        self.take(r"\matend")
        rows = [r for r in rows + [row] if r]
        if not rows or len({len(r) for r in rows}) != 1:
            raise NotMath("ragged matrix")
        return ("expr", self.S.Matrix(rows))

    def big_sum(self):
        r"""\sum_{k=a}^{b} body, kept unevaluated (compared by structure)."""
        S = self.S
        self.take("_")
        self.take("{")
        var = self.take()
        self.take("=")
        lo = self.expr(self.sum())
        self.take("}")
        self.take("^")
        hi = self.expr(self.arg())
        body = self.expr(self.term())
        return ("expr", S.Sum(body, (S.Symbol(var[1]), lo, hi)))


GREEK = {"alpha", "beta", "gamma", "delta", "theta", "lambda", "mu", "sigma", "phi", "omega", "rho", "tau", "epsilon"}


def _looks_bare(text):
    """True when text is already a bare answer: it tokenizes as math (no prose words)."""
    try:
        return len(text) <= MAX_ANSWER_CHARS and bool(tokenize(clean(text)))
    except NotMath:
        return False


def parse(text):
    """Answer text -> a value (see Parser). Raises NotMath for anything outside the grammar."""
    text = clean(text)
    if not text or len(text) > MAX_ANSWER_CHARS:
        raise NotMath("empty or too long")
    if re.search(r"[^\x00-\x7f]", text):
        raise NotMath("non-ASCII text")
    if re.fullmatch(r"[-+]?\d{1,3}([ ,]\d{3})+(\.\d+)?%?", text) and not text.lstrip("-+").startswith("0"):
        text = text.replace(",", "").replace(" ", "")  # 7,425,000 and 1 000: thousands separators
    return Parser(tokenize(text)).answer()


# ----------------------------------------------------------------------------------------
# math answers, step 3: decide equality. Conventions (documented in docs/rewards.md too):
# - exact numbers compare exactly (1/3 is not 0.333333); a decimal with more than 6
#   places is a rounded value and compares to a relative 1e-9 (0.0833333333 is 1/12);
# - a percentage equals both its number and its fraction (28% = 28 = 0.28);
# - "1,22" alone is read as 1.22 or as the list 1, 22 (decimal comma); "7,425,000" and
#   "1 000" are thousands; "x = 5", "(p,q) = (3,2)", "f(x) = 1" compare by their right side;
# - the reference decides whether order matters: a comma list or a tuple is ordered
#   ("4, 10, -2" is not "10, 4, -2", as in the MATH grader); a set \{...\}, the two values
#   of a ±, a list of tuples and separately boxed answers are unordered, repeats ignored;
# - (a, b) is a tuple and also equals the open interval; a < x < b equals the interval;
# - equations are equal when one is a non-zero multiple of the other (2x+4y-3=0 is
#   y = -x/2 + 3/4); inequalities when a positive multiple (-x > -1 is x < 1);
# - 2^10 is 1024, 2\frac12 is 5/2, \sin 2x is sin(2x), e is Euler's number;
# - expressions with variables are compared at five fixed points, two of them negative
#   (where a side is not real there, as sqrt(x)sqrt(y), that point is skipped); when
#   they cannot be evaluated (f(x), sums), by structure after expanding;
# - in a chain a = b = c the last part is the answer (x = 2+3 = 5 is 5);
# - a computation left undone is not the answer to a number: "76 + 36" or "(9+1)" for 112
#   or 10 scores 0 (Math-Verify accepts it). RL on arithmetic finds that loophole within
#   a few steps, answering by restating the question; a fraction (1/2, \frac12) stays a number.

REL_TOL = 1e-9


def values(answer):
    """All readings of an answer: [value, ...]; two for "1,22", which may be 1.22."""
    out = [canon(parse(answer))]
    text = clean(answer)
    if re.fullmatch(r"[-+]?\d+,\d+", text) and not re.fullmatch(r"[-+]?[1-9]\d{0,2},\d{3}", text):
        out.append(("expr", _sympy().Rational(text.replace(",", "."))))
    return out


def canon(v):
    """Normal form of a parsed value: relations resolved, ± expanded, percent alternatives."""
    S, kind = _sympy(), v[0]
    if kind == "percent":
        return ("alts", [("expr", v[1]), ("expr", v[1] / 100)])
    if kind == "expr":
        e = v[1]
        pm = S.Symbol("PLUSMINUS")
        if not isinstance(e, S.MatrixBase) and pm in e.free_symbols:
            return ("list", [("expr", e.subs(pm, 1)), ("expr", e.subs(pm, -1))], False)
        return v
    if kind == "list":
        items, ordered = [], v[2]
        for x in map(canon, v[1]):
            if x[0] == "list" and not x[2]:  # a ± inside a list: both values are answers
                items += x[1]
                ordered = False
            else:
                items.append(x)
        if len(items) == 1:
            return items[0]
        return _group_solutions(items, ordered)
    if kind == "tuple":
        return ("tuple", [canon(x) for x in v[1]], v[2])
    if kind == "set":
        return ("set", [canon(x) for x in v[1]])
    if kind == "union":
        return ("union", [canon(x) for x in v[1]])
    if kind == "rel":
        return _relation(v[1], [canon(x) for x in v[2]])
    return v


def named(v):
    """True for a left side that only names the answer: x, a_3, f(x), |AB|, (p, q), A:B."""
    S = _sympy()
    if v[0] == "tuple":
        return all(named(x) for x in v[1])
    if v[0] != "expr" or isinstance(v[1], S.MatrixBase):
        return False
    return _is_name(v[1])


def _is_name(e):
    """x, a_3, f(x), |AB|, or a ratio of names like NO/BO; not -x, 2x, x^{-1} or x + y."""
    S = _sympy()
    if e.is_Symbol or isinstance(e, (S.Abs, S.core.function.AppliedUndef)):
        return bool(e.free_symbols)
    if e.is_Mul:
        tops = [f for f in e.args if not (f.is_Pow and f.exp == -1)]
        return bool(tops) and all(_is_name(f) for f in tops) and all(
            _is_name(f.base) for f in e.args if f.is_Pow and f.exp == -1)
    return False


def _relation(ops, parts):
    S = _sympy()
    if "~" in ops:  # x = 1/3 ≈ 0.33: the approximation is not the answer
        k = ops.index("~")
        if k == 0 and named(parts[0]):
            ops = ["="] + ops[1:]
        else:
            ops, parts = ops[:k], parts[:k + 1]
        if not ops:
            return parts[0]
    if ops == ["in"]:
        return parts[1]
    if all(op == "=" for op in ops):
        if named(parts[0]):
            return ("eq", parts[0], parts[-1])
        if all(p[0] == "expr" and not isinstance(p[1], S.MatrixBase) and not p[1].free_symbols for p in parts):
            return parts[-1]  # 5+5+1 = 11: a computation, its result is the answer
        return ("eq", parts[0], parts[-1])
    if len(ops) == 1 and ops[0] in ("<", "<=", ">", ">=", "!="):
        a, b = _expr(parts[0]), _expr(parts[1])
        op = {">": "<", ">=": "<="}.get(ops[0], ops[0])
        return ("ineq", op, b - a if ops[0] in (">", ">=") else a - b)
    if len(ops) == 2 and named(parts[1]) and all(p[0] == "expr" for p in parts):
        if set(ops) <= {">", ">="}:
            ops, parts = [{">": "<", ">=": "<="}[o] for o in reversed(ops)], parts[::-1]
        if set(ops) <= {"<", "<="}:
            lo, mid, hi = (p[1] for p in parts)
            closed = (ops[0] == "<=", ops[1] == "<=")
            if isinstance(mid, S.Abs) and lo.is_number and lo >= 0:  # a <= |z| <= b
                return ("union", [("interval", -hi, -lo, closed[1], closed[0]), ("interval", lo, hi, *closed)])
            return ("interval", lo, hi, *closed)
    return ("rel", ops, parts)


def _expr(v):
    if v[0] != "expr":
        raise NotMath("a relation between non-numbers")
    return v[1]


def _group_solutions(items, ordered):
    """p=5, q=2, p=7, q=2 -> the tuples (5, 2), (7, 2): a list of solutions, unordered."""
    if all(x[0] == "eq" and named(x[1]) for x in items) and len(items) > 1:
        names = [x[1] for x in items]
        width = next((k for k in range(1, len(names)) if names[k] == names[0]), len(names))
        if width < len(items) and len(items) % width == 0 and all(
                names[i] == names[i % width] for i in range(len(names))):
            return ("list", [("tuple", [x[2] for x in items[i:i + width]], "(")
                             for i in range(0, len(items), width)], False)
    return ("list", items, ordered)


def _points(symbols):
    """Five fixed assignments of the variables: deterministic, away from 0, 1 and each other;
    two are negative, so |x| and x, or sqrt(x^2) and x, differ."""
    S = _sympy()
    q = [S.Rational(a, b) for a, b in ((13, 10), (17, 7), (5, 11), (23, 13), (-29, 17), (31, 19), (-37, 23))]
    syms = sorted(symbols, key=str)
    return [{s: q[(3 * t + j) % len(q)] for j, s in enumerate(syms)} for t in range(5)]


def _number(e, point):
    """e at the point, to 40 digits, or None when it has no finite value there."""
    S = _sympy()
    if e.has(S.Sum):
        return None  # an unevaluated sum: compared by structure, never summed
    v = S.N(e.subs(point), 40)
    if not v.is_number or v.has(S.zoo, S.nan, S.oo, -S.oo) or not v.is_finite:
        return None
    return v


def _close(x, y, tol):
    """|x - y| <= tol * max(|x|, |y|): relative, so 1e-10 is not 0 and 10^400 is not 72."""
    S = _sympy()
    return bool(S.N(abs(x - y), 40) <= tol * S.N(max(abs(x), abs(y)), 40))


def same_expr(a, b):
    S = _sympy()
    if isinstance(a, S.MatrixBase) or isinstance(b, S.MatrixBase):
        return (isinstance(a, S.MatrixBase) and isinstance(b, S.MatrixBase) and a.shape == b.shape
                and all(same_expr(x, y) for x, y in zip(a, b)))
    if a == b:
        return True
    if (a.is_Rational and b.is_Rational) or a.has(S.oo, -S.oo) or b.has(S.oo, -S.oo):
        return False  # exact numbers compare exactly
    # a decimal the model rounded compares to REL_TOL; exact expressions to 40 digits
    tol = REL_TOL if a.has(S.Float) or b.has(S.Float) else S.Rational(1, 10 ** 30)
    for point in _points(a.free_symbols | b.free_symbols):
        x, y = _number(a, point), _number(b, point)
        if x is None or y is None:
            return S.expand(a - b) == 0  # undefined functions, sums: by algebra
        if any(v < 0 for v in point.values()) and not (x.is_real and y.is_real):
            continue  # sqrt(x)sqrt(y) = sqrt(xy) only for x, y > 0: judge on the real branch
        if not _close(x, y, tol):
            return False
    return True


def _proportional(d1, d2, positive):
    """d1 = c * d2 for one constant c != 0 (c > 0 when positive): the same relation."""
    S = _sympy()
    tol = REL_TOL if d1.has(S.Float) or d2.has(S.Float) else S.Rational(1, 10 ** 30)
    ratios = []
    for point in _points(d1.free_symbols | d2.free_symbols):
        x, y = _number(d1, point), _number(d2, point)
        if x is None or y is None:
            return d1 == d2 or (not positive and d1 == -d2)
        if x == 0 or y == 0:
            if x == 0 and y == 0:
                continue
            return False
        ratios.append(S.N(x / y, 40))
    if not ratios:
        return S.expand(d1) == 0 and S.expand(d2) == 0
    c = ratios[0]
    return all(_close(r, c, tol) for r in ratios) and (not positive or (c.is_real and c > 0))


def _as_interval(v):
    """x < 3 -> the interval (-oo, 3); None when the relation is not about one variable."""
    S = _sympy()
    _, op, d = v
    if op == "!=" or len(d.free_symbols) != 1:
        return None
    x = next(iter(d.free_symbols))
    k, m = d.diff(x), d.subs(x, 0)
    if k.free_symbols or k == 0 or d != S.expand(k * x + m):
        return None
    c = -m / k
    if k > 0:
        return ("interval", -S.oo, c, False, op == "<=")
    return ("interval", c, S.oo, op == "<=", False)


def _name(v):
    return "e" if v == _sympy().E else str(v)


def _norm_text(s):
    s = re.sub(r"\\(?:text\w*|math\w+|mbox)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"[\s{}()\\$]", "", s)
    return s.casefold() if len(s) > 1 else s


def same(a, b):
    """Equality of two canonical values under the conventions above."""
    if a[0] == "alts":
        return any(same(x, b) for x in a[1])
    if b[0] == "alts":
        return any(same(a, y) for y in b[1])
    ka, kb = a[0], b[0]
    if ka == "eq" and kb == "eq":
        if named(a[1]) and named(b[1]):
            return same(a[2], b[2])
        if a[1][0] == b[1][0] == a[2][0] == b[2][0] == "expr":
            return _proportional(a[1][1] - a[2][1], b[1][1] - b[2][1], positive=False)
        return same(a[1], b[1]) and same(a[2], b[2])
    if ka == "eq" and named(a[1]):
        return same(a[2], b)
    if kb == "eq" and named(b[1]):
        return same(a, b[2])
    if ka == kb == "expr":
        return same_expr(a[1], b[1])
    if ka == kb == "text" or {ka, kb} == {"text", "expr"}:
        return _norm_text(_name(a[1])) == _norm_text(_name(b[1]))
    if ka == kb == "ineq":
        return a[1] == b[1] and _proportional(a[2], b[2], positive=a[1] != "!=")
    if ka == "ineq" or kb == "ineq":
        a, b = (_as_interval(a), b) if ka == "ineq" else (a, _as_interval(b))
        return a is not None and b is not None and same(a, b)
    if ka == "tuple" and kb == "interval" or ka == "interval" and kb == "tuple":
        t, iv = (a, b) if ka == "tuple" else (b, a)
        return (t[2] == "(" and len(t[1]) == 2 and not iv[3] and not iv[4]
                and same(t[1][0], ("expr", iv[1])) and same(t[1][1], ("expr", iv[2])))
    if ka == kb == "interval":
        return a[3:] == b[3:] and same_expr(a[1], b[1]) and same_expr(a[2], b[2])
    if ka == kb == "union":
        return _same_items(a[1], b[1], ordered=False)
    if ka == "set" and len(a[1]) > 1 and kb not in ("list", "tuple", "set", "union"):
        items = _unique(a[1])  # one answer written twice: \boxed{15\frac{39}{40}} or \boxed{\frac{639}{40}}
        return len(items) == 1 and same(items[0], b)
    if ka in ("list", "tuple", "set") and kb in ("list", "tuple", "set"):
        if ka == kb == "tuple" and a[2] != b[2]:
            return False
        # the reference (b) decides whether order matters: a set {2, 1} is not the tuple (1, 2)
        ordered = kb == "tuple" or (kb == "list" and b[2] and not any(y[0] == "tuple" for y in b[1]))
        return _same_items(a[1], b[1], ordered)
    if ka == kb == "rel":
        return a[1] == b[1] and _same_items(a[2], b[2], ordered=True)
    return False


def _same_items(xs, ys, ordered):
    if all(v[0] == "eq" and named(v[1]) for v in xs + ys) and len(xs) == len(ys):
        by_name = [[y for y in ys if x[1][0] == y[1][0] == "expr" and x[1][1] == y[1][1]]
                   for x in xs]  # a_3 = 2, a_37 = 19: match by name when the names agree
        if all(len(m) == 1 for m in by_name):
            return all(same(x[2], m[0][2]) for x, m in zip(xs, by_name))
    xs = [x[2] if x[0] == "eq" and named(x[1]) else x for x in xs]
    ys = [y[2] if y[0] == "eq" and named(y[1]) else y for y in ys]
    if ordered:
        return len(xs) == len(ys) and all(same(x, y) for x, y in zip(xs, ys))
    xs, ys = _unique(xs), _unique(ys)
    return len(xs) == len(ys) and all(any(same(x, y) for y in ys) for x in xs)


def _unique(items):
    out = []
    for x in items:
        if not any(same(x, y) for y in out):
            out.append(x)
    return out


# a computation left undone: plain numbers joined by + - * and brackets (a lone / is a fraction)
DIGITS_AND_OPS = re.compile(r"[\d.()+\-*/]*\d[\d.()+\-*/]*")
BINARY_OP = re.compile(r"[\d)][-+*][\d(]")
NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")  # 112, -3.5, 10,080


def _bare(text):
    """An answer with its typesetting and spacing gone, and the right side of a chain."""
    text = text.rsplit("=", 1)[-1]
    for a, b in [("\\cdot", "*"), ("\\times", "*"), ("\\div", "/"), ("×", "*"), ("·", "*"), ("÷", "/"),
                 ("−", "-"), ("{,}", ",")]:
        text = text.replace(a, b)
    return re.sub(r"\\left|\\right|\\[()\[\],;:! ]|[\s~{}$]", "", text).rstrip(".")


def undone(answer, reference):
    """True when `answer` is arithmetic on plain numbers left undone ("76 + 36", "(9+1)")
    and the reference is a number: "76 + 36" is not the answer to "What is 76 + 36?"."""
    a = _bare(answer)
    return bool(NUMBER.fullmatch(_bare(reference)) and DIGITS_AND_OPS.fullmatch(a) and BINARY_OP.search(a))


def _check(pred, gold):
    """The whole comparison, run inside the worker process: extract, parse, compare."""
    a, b = extract_answer(pred), extract_answer(gold)
    if not a or not b or undone(a, b) or undone(b, a):  # both ways: the majority vote compares answers
        return False
    try:
        return any(same(x, y) for x in values(a) for y in values(b))
    except (NotMath, ArithmeticError, TypeError, ValueError, AttributeError, IndexError, RecursionError):
        return _norm_text(clean(a)) == _norm_text(clean(b))  # not math (or not comparable): as text


# ----------------------------------------------------------------------------------------
# math answers, step 4: a hard time limit. sympy can spend minutes in C-level code that no
# signal interrupts, so every comparison but one of two plain integers runs in a worker
# process (this file, run with --math-worker), and a worker that misses the deadline is
# killed, not asked to stop.

MATH_TIMEOUT = 3.0  # seconds per comparison, after the worker has started
MAX_IDLE_WORKERS = 2 * (os.cpu_count() or 1)  # more idle workers than this are stopped
_idle_workers, _workers_lock = [], threading.Lock()


def _start_math_worker():
    # a session of its own: the terminal's Ctrl-C, meant for the run (which stops at a step's end), does
    # not kill the worker in the middle of a comparison (it dies with its parent all the same)
    proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), "--math-worker"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    if _read_line(proc, 60.0) != b"ready\n":  # importing sympy takes ~0.5 s
        _stop(proc)
        raise RuntimeError("the math worker process did not start")
    return proc


def _stop(proc):
    proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        try:
            pipe.close()
        except OSError:  # unflushed bytes for a dead worker
            pass


def _read_line(proc, timeout):
    """One line from the worker, or None when it does not answer in time (or died)."""
    fd, buf, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:  # not select(): fine past 1024 open files
        sel.register(fd, selectors.EVENT_READ)
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            buf += chunk
    return buf


# R1's layout, exactly: one <think>...</think> then one <answer>...</answer>, then nothing but
# whitespace (fullmatch with DOTALL, so no line-anchor trick lets trailing text through).
# rewards.py's format rule is this regex; here it lets an integer answer skip the worker.
R1_FORMAT = re.compile(r"\s*<think>((?!</?think>).)*</think>\s*<answer>((?!</?answer>|</?think>).)*</answer>\s*",
                       flags=re.DOTALL)

# Two integers need no worker. A vote over 4000 samples makes thousands of comparisons of
# answers like "7" and "12", and each trip to the worker costs milliseconds.
BARE_INT = re.compile(r"\s*(-?[0-9]{1,100})\s*")  # ASCII digits only: \d also matches "٣"


def _int_answer(text):
    """The integer a bare answer or an R1-format completion gives, else None."""
    m = BARE_INT.fullmatch(text)
    if m is None and R1_FORMAT.fullmatch(text):
        m = BARE_INT.fullmatch(text[text.rindex("<answer>") + len("<answer>"):text.rindex("</answer>")])
    return int(m.group(1)) if m else None


def math_equal(pred, gold, timeout=MATH_TIMEOUT):
    """True when pred (a whole completion or a bare answer) has the value of the reference
    gold. False on a timeout: the worker doing the comparison is killed."""
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    gold_int = BARE_INT.fullmatch(gold)  # checked first: the completion is only parsed for an integer reference
    pred_int = _int_answer(pred) if gold_int else None
    if pred_int is not None:
        return pred_int == int(gold_int.group(1))
    request = json.dumps([pred, gold]).encode() + b"\n"
    for attempt in range(2):  # a second try, on a new worker, only when the first one had died
        proc = None
        with _workers_lock:
            while _idle_workers and attempt == 0 and proc is None:
                proc = _idle_workers.pop()
                if proc.poll() is not None:  # died while idle
                    _stop(proc)
                    proc = None
        proc = proc or _start_math_worker()
        try:
            proc.stdin.write(request)
            proc.stdin.flush()
            reply = _read_line(proc, timeout)
        except OSError:  # a broken pipe: the worker had died
            reply = None
        if reply is not None:
            break
        died = proc.poll() is not None
        _stop(proc)
        if not died:
            return False  # past the time limit: killed
    else:
        return False
    with _workers_lock:
        keep = len(_idle_workers) < MAX_IDLE_WORKERS
        if keep:
            _idle_workers.append(proc)
    if not keep:
        _stop(proc)
    return json.loads(reply) is True


def _math_worker():
    """Answer [pred, gold] lines with true/false until stdin closes."""
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a runaway expansion fails here, not in the host
    parent = os.getppid()

    def watch():  # die with the parent, even in the middle of a long check
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)
    threading.Thread(target=watch, daemon=True).start()
    sys.setrecursionlimit(5000)
    _sympy()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        try:
            pred, gold = json.loads(line)
            equal = _check(pred, gold)
        except Exception:  # noqa: BLE001 - any failure is "not equal"
            equal = False
        sys.stdout.write("true\n" if equal else "false\n")
        sys.stdout.flush()


if __name__ == "__main__":
    if sys.argv[1:] == ["--math-worker"]:
        _math_worker()
    else:
        sys.exit("usage: python grader.py --math-worker (started by math_equal; grader.py is a module)")
