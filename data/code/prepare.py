'''A small built-in set of simple programming tasks for the code reward: writes train.jsonl and test.jsonl.

Records are {"prompt", "tests", "lang": "en"}. "tests" is the JSON text of the sandbox's test
list, [{"input": stdin, "output": expected stdout}] for programs and
[{"fn_name", "args", "expected"}] for functions: a string, because read_jsonl (in
nanor1/common.py; grpo.py and reject_sample.py load prompts with it) takes only string
fields. Each task keeps a reference solution here, never written out, so
tests/test_prepare.py can check every task is solvable and that wrong programs fail.

    python data/code/prepare.py                       # 20 train / 6 test, seed 0
    python data/code/prepare.py --num-test 10 --seed 1 --out-dir out/code

Deliberately small and easy: enough for a smoke run of --rewards code, not a benchmark.
'''

import argparse
import json
import os
import random


def program(name, text, cases, solution):
    """A task read from stdin: cases are (stdin, expected stdout)."""
    return {"name": name, "fn_name": None, "text": text, "solution": solution,
            "tests": [{"input": i, "output": o} for i, o in cases]}


def function(signature, text, cases, solution):
    """A task that defines a function: cases are (args, expected return value), JSON values."""
    name = signature.split("(")[0]
    return {"name": name, "fn_name": name, "signature": signature, "text": text, "solution": solution,
            "tests": [{"fn_name": name, "args": a, "expected": e} for a, e in cases]}


TASKS = [
    program("reverse_line", "Read one line and print it reversed.",
            [("hello\n", "olleh\n"), ("a b c\n", "c b a\n"), ("racecar\n", "racecar\n")],
            "print(input()[::-1])"),
    program("digit_sum", "Read a non-negative integer and print the sum of its digits.",
            [("0\n", "0\n"), ("12345\n", "15\n"), ("9999999999\n", "90\n")],
            "print(sum(int(c) for c in input().strip()))"),
    program("fizzbuzz", "Read n and print the numbers 1 to n, one per line, but Fizz for multiples of 3, "
            "Buzz for multiples of 5 and FizzBuzz for multiples of both.",
            [("5\n", "1\n2\nFizz\n4\nBuzz\n"), ("1\n", "1\n"),
             ("15\n", "1\n2\nFizz\n4\nBuzz\nFizz\n7\n8\nFizz\nBuzz\n11\nFizz\n13\n14\nFizzBuzz\n")],
            "for i in range(1, int(input()) + 1):\n"
            "    print('FizzBuzz' if i % 15 == 0 else 'Fizz' if i % 3 == 0 else 'Buzz' if i % 5 == 0 else i)"),
    program("count_vowels", "Read one line and print how many vowels (a, e, i, o, u, either case) it has.",
            [("Hello World\n", "3\n"), ("rhythm\n", "0\n"), ("AEIOU aeiou\n", "10\n")],
            "print(sum(c in 'aeiouAEIOU' for c in input()))"),
    program("sum_list", "The first line holds n, the second n integers separated by spaces. Print their sum.",
            [("3\n1 2 3\n", "6\n"), ("1\n-5\n", "-5\n"), ("4\n100 -50 25 -75\n", "0\n")],
            "input()\nprint(sum(map(int, input().split())))"),
    program("running_max", "Read integers on one line and print, space separated, the largest value seen so far "
            "at each position.",
            [("3 1 4 1 5\n", "3 3 4 4 5\n"), ("-1 -2 -3\n", "-1 -1 -1\n"), ("7\n", "7\n")],
            "best, out = None, []\nfor x in map(int, input().split()):\n"
            "    best = x if best is None else max(best, x)\n    out.append(best)\nprint(*out)"),
    program("word_count", "Read all of standard input and print the number of words (runs of non-space characters).",
            [("the quick brown fox\n", "4\n"), ("  one\n\ntwo   three  \n", "3\n"), ("word\n", "1\n")],
            "import sys\nprint(len(sys.stdin.read().split()))"),
    program("triangle", "Read n and print n lines: line i has i stars.",
            [("3\n", "*\n**\n***\n"), ("1\n", "*\n"), ("5\n", "*\n**\n***\n****\n*****\n")],
            "for i in range(1, int(input()) + 1):\n    print('*' * i)"),
    program("min_max", "Read integers on one line and print the smallest and the largest, separated by a space.",
            [("3 1 4 1 5\n", "1 5\n"), ("-7\n", "-7 -7\n"), ("10 -10 0\n", "-10 10\n")],
            "xs = list(map(int, input().split()))\nprint(min(xs), max(xs))"),
    program("shout", "Read lines until the end of input and print each one in upper case.",
            [("hello\nworld\n", "HELLO\nWORLD\n"), ("MiXeD 123\n", "MIXED 123\n")],
            "import sys\nfor line in sys.stdin:\n    print(line.rstrip('\\n').upper())"),
    program("collatz_steps", "Read a positive integer n. Repeat n = n / 2 if n is even, else n = 3n + 1, until n is 1; "
            "print the number of steps.",
            [("1\n", "0\n"), ("6\n", "8\n"), ("27\n", "111\n")],
            "n, steps = int(input()), 0\nwhile n != 1:\n    n = n // 2 if n % 2 == 0 else 3 * n + 1\n"
            "    steps += 1\nprint(steps)"),
    program("binary", "Read a non-negative integer and print it in binary, without a prefix.",
            [("0\n", "0\n"), ("5\n", "101\n"), ("255\n", "11111111\n")],
            "print(format(int(input()), 'b'))"),
    function("is_prime(n)", "Return True if the integer n is a prime number, else False.",
             [([0], False), ([1], False), ([2], True), ([97], True), ([91], False)],
             "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))"),
    function("gcd(a, b)", "Return the greatest common divisor of two non-negative integers, not both zero.",
             [([12, 18], 6), ([7, 5], 1), ([0, 9], 9), ([100, 10], 10)],
             "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a"),
    function("is_palindrome(s)", "Return True if the string s reads the same backwards, ignoring case and "
             "every character that is not a letter or digit.",
             [(["A man, a plan, a canal: Panama"], True), (["hello"], False), ([""], True), (["No 'x' in Nixon"], True)],
             "def is_palindrome(s):\n    t = [c.lower() for c in s if c.isalnum()]\n    return t == t[::-1]"),
    function("factorial(n)", "Return n! for a non-negative integer n.",
             [([0], 1), ([5], 120), ([20], 2432902008176640000)],
             "def factorial(n):\n    out = 1\n    for i in range(2, n + 1):\n        out *= i\n    return out"),
    function("fibonacci(n)", "Return the n-th Fibonacci number, with fibonacci(0) = 0 and fibonacci(1) = 1.",
             [([0], 0), ([1], 1), ([10], 55), ([50], 12586269025)],
             "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a"),
    function("second_largest(nums)", "Return the largest value in the list that is smaller than its maximum "
             "(the list has at least two different values).",
             [([[3, 1, 4, 1, 5]], 4), ([[2, 2, 1]], 1), ([[10, 20]], 10)],
             "def second_largest(nums):\n    return sorted(set(nums))[-2]"),
    function("unique_in_order(items)", "Return the list without repeated values, each kept where it first appears.",
             [([[1, 2, 1, 3, 2]], [1, 2, 3]), ([[]], []), ([["b", "a", "b"]], ["b", "a"])],
             "def unique_in_order(items):\n    return list(dict.fromkeys(items))"),
    function("count_words(text)", "Return a dict from each lower-cased word of the text (split on whitespace) "
             "to how often it occurs.",
             [(["the cat The dog"], {"the": 2, "cat": 1, "dog": 1}), ([""], {}), (["a a a"], {"a": 3})],
             "def count_words(text):\n    out = {}\n    for w in text.lower().split():\n"
             "        out[w] = out.get(w, 0) + 1\n    return out"),
    function("flatten(nested)", "Return the values of an arbitrarily nested list as one flat list, in order.",
             [([[1, [2, [3, 4]], 5]], [1, 2, 3, 4, 5]), ([[]], []), ([[[[]], [6]]], [6])],
             "def flatten(nested):\n    out = []\n    for x in nested:\n"
             "        out += flatten(x) if isinstance(x, list) else [x]\n    return out"),
    function("caesar(text, shift)", "Shift every letter of the text by shift places in the alphabet, wrapping "
             "around and keeping its case; other characters stay as they are.",
             [(["abc", 1], "bcd"), (["xyz", 3], "abc"), (["Hello, World!", 13], "Uryyb, Jbeyq!")],
             "def caesar(text, shift):\n    out = ''\n    for c in text:\n        if c.isalpha():\n"
             "            base = ord('a') if c.islower() else ord('A')\n"
             "            c = chr((ord(c) - base + shift) % 26 + base)\n        out += c\n    return out"),
    function("is_anagram(a, b)", "Return True if the two strings use exactly the same letters the same number of times.",
             [(["listen", "silent"], True), (["abc", "abd"], False), (["aab", "abb"], False)],
             "def is_anagram(a, b):\n    return sorted(a) == sorted(b)"),
    function("rotate(nums, k)", "Return the list rotated right by k places (k may exceed its length).",
             [([[1, 2, 3, 4, 5], 2], [4, 5, 1, 2, 3]), ([[1, 2, 3], 0], [1, 2, 3]), ([[1, 2, 3], 4], [3, 1, 2]), ([[], 3], [])],
             "def rotate(nums, k):\n    if not nums:\n        return []\n    k %= len(nums)\n"
             "    return nums[-k:] + nums[:-k] if k else list(nums)"),
    function("two_sum(nums, target)", "Return [i, j] with i < j such that nums[i] + nums[j] == target "
             "(exactly one such pair exists).",
             [([[2, 7, 11, 15], 9], [0, 1]), ([[3, 2, 4], 6], [1, 2]), ([[3, 3], 6], [0, 1])],
             "def two_sum(nums, target):\n    seen = {}\n    for j, x in enumerate(nums):\n"
             "        if target - x in seen:\n            return [seen[target - x], j]\n        seen[x] = j"),
    function("to_roman(n)", "Return n (1 to 3999) as a Roman numeral.",
             [([3], "III"), ([4], "IV"), ([1994], "MCMXCIV"), ([3999], "MMMCMXCIX")],
             "def to_roman(n):\n    out = ''\n"
             "    for v, s in [(1000, 'M'), (900, 'CM'), (500, 'D'), (400, 'CD'), (100, 'C'), (90, 'XC'),\n"
             "                 (50, 'L'), (40, 'XL'), (10, 'X'), (9, 'IX'), (5, 'V'), (4, 'IV'), (1, 'I')]:\n"
             "        while n >= v:\n            out, n = out + s, n - v\n    return out"),
]


def prompt(task):
    """The task text plus what rewards.code needs: a ```python block, and how it is run."""
    fence = "Give the code in one ```python fenced block."
    if task["fn_name"] is None:
        return f"{task['text']}\n\nWrite a complete Python program: it reads standard input and prints to standard output. {fence}"
    return (f"Write a Python function `{task['signature']}`. {task['text']}\n\nDefine the function `{task['fn_name']}` "
            f"only: it is called directly with the arguments, so do not read input or print the result. {fence}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-test", type=int, default=6, help=f"held-out tasks, of {len(TASKS)}")
    p.add_argument("--seed", type=int, default=0, help="random seed of the split")
    p.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)), help="output folder")
    args = p.parse_args()
    if not 0 < args.num_test < len(TASKS):
        p.error(f"--num-test must be between 1 and {len(TASKS) - 1}")

    order = list(range(len(TASKS)))
    random.Random(args.seed).shuffle(order)
    parts = [("train", sorted(order[args.num_test:])), ("test", sorted(order[:args.num_test]))]
    os.makedirs(args.out_dir, exist_ok=True)
    for name, idx in parts:
        path = os.path.join(args.out_dir, f"{name}.jsonl")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for i in idx:  # the reference solution stays here: the model must not see it
                f.write(json.dumps({"prompt": prompt(TASKS[i]), "tests": json.dumps(TASKS[i]["tests"]), "lang": "en"}) + "\n")
        os.replace(path + ".tmp", path)
        print(f"{path}: {len(idx)} tasks")


if __name__ == "__main__":
    main()
