"""Code reward and its sandbox: right answers pass, and hostile programs neither escape nor fake a pass.

Each attack is run with every layer alone (where this machine has it) and with all of them,
and once with none, to show the attack is real: a test that passes without the protection
would prove nothing.
"""

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
import uuid

import pytest

from nanor1 import sandbox as S

ROOT = os.geteuid() == 0


def landlock_abi():
    try:
        return max(ctypes.CDLL(None, use_errno=True).syscall(444, None, 0, 1), 0)
    except (OSError, AttributeError):
        return 0


# every layer alone, skipped where it does not apply, then all of them
ONE_LAYER = [pytest.param(("drop",), marks=pytest.mark.skipif(not ROOT, reason="the drop only applies to root")),
             pytest.param(("landlock",), marks=pytest.mark.skipif(not landlock_abi(), reason="no Landlock")),
             ("audit",), S.SANDBOX_LAYERS]


def fence(code, lang="python"):
    return f"<think>let me write it</think>\n```{lang}\n{code}\n```\n"


ADD = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6"},
       {"input": "0 0\n", "output": "0\n"}, {"input": "7 8\n", "output": "15\n"}]


@pytest.fixture
def canary(tmp_path):
    """A root-owned (when we are root) 0600 file with a secret, in a 0700 pytest directory."""
    path = tmp_path / "canary.txt"
    path.write_text("CANARY-" + uuid.uuid4().hex)
    path.chmod(0o600)
    return path


def survivors(marker):
    """Pids of processes whose command line contains marker."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


# ----------------------------------------------------------------------------------------
# right answers


def test_correct_stdio_solution_passes():
    assert S.code_reward(fence("a, b = map(int, input().split())\nprint(a + b)"), ADD, timeout=2) == 1.0


def test_partial_and_strict():
    code = "a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)"  # right on tests 1 and 3
    assert S.code_reward(fence(code), ADD, timeout=2) == 0.5
    assert S.code_reward(fence(code), ADD, timeout=2, strict=True) == 0.0


def test_prefix_and_extra_lines_fail_trailing_whitespace_does_not():
    tests = [{"input": "", "output": "1\n2\n"}]
    assert S.code_reward(fence("print(1)"), tests, timeout=2) == 0.0  # only a prefix
    assert S.code_reward(fence("print(1); print(2); print(3)"), tests, timeout=2) == 0.0
    assert S.code_reward(fence("print('1   '); print('2\\t\\r'); print(); print()"), tests, timeout=2) == 1.0


def test_exit_and_quit_end_a_right_program_as_a_shell_sees_it():
    # competitive programs often end with exit(); python -S has no site, which defines it
    right = "a, b = map(int, input().split())\nprint(a + b)\n"
    for end in ["exit()", "quit()", "exit(0)", "import sys\nsys.exit(0)", "raise SystemExit"]:
        assert S.code_reward(fence(right + end), ADD, timeout=2) == 1.0, end
    for end in ["exit(1)", "quit(3)", "import sys\nsys.exit('bad')"]:  # a non-zero exit code fails
        assert S.code_reward(fence(right + end), ADD, timeout=2) == 0.0, end


def test_crash_after_right_output_fails():
    assert S.code_reward(fence("print(3)\nraise ValueError"), ADD[:1], timeout=2) == 0.0


def test_functions_with_list_and_dict_results():
    code = "def pair(a, b):\n    return [a, b]\n\ndef count(s):\n    return {c: s.count(c) for c in s}"
    tests = json.dumps([{"fn_name": "pair", "args": [1, "x"], "expected": [1, "x"]},
                        {"fn_name": "count", "args": ["aab"], "expected": {"a": 2, "b": 1}},
                        {"fn_name": "pair", "args": [1, 2], "expected": [2, 1]}])  # a JSON string of tests
    assert S.code_reward(fence(code), tests, timeout=2) == pytest.approx(2 / 3)


def test_solution_class_method_and_strict_json_types():
    code = "class Solution:\n    def twoSum(self, nums, target):\n        return [0, 1]\n    def ok(self):\n        return 1"
    tests = [{"fn_name": "twoSum", "args": [[2, 7], 9], "expected": [0, 1]}]
    assert S.code_reward(fence(code), tests, timeout=2) == 1.0
    assert S.code_reward(fence(code), [{"fn_name": "ok", "args": [], "expected": True}], timeout=2) == 0.0


def test_no_code_or_no_tests_is_zero():
    assert S.code_reward("the answer is print(3)", ADD, timeout=2) == 0.0
    assert S.code_reward(fence("print(3)"), [], timeout=2) == 0.0
    assert S.code_reward(fence("print(3)"), "[]", timeout=2) == 0.0


def test_last_python_block_after_think_is_used():
    right, wrong = "print(sum(map(int, input().split())))", "print(0)"
    text = f"<think>\n```python\n{right}\n```\n</think>\n```py\n{wrong}\n```\n```\n{right}\n```\n```cpp\nint main(){{}}\n```"
    assert S.extract_code(text).strip() == right
    assert S.code_reward(text, ADD, timeout=2) == 1.0
    assert S.code_reward(f"<think>\n```python\n{right}\n```\n</think> no code here", ADD, timeout=2) == 0.0


def test_runs_in_parallel():
    t = time.monotonic()
    rewards = S.code_rewards([fence("import time; time.sleep(1); print(1)")] * 8,
                             [[{"input": "", "output": "1"}]] * 8, timeout=5)
    assert rewards == [1.0] * 8
    assert time.monotonic() - t < 6  # serially: more than 8 s


def test_temp_dir_removed_and_environment_scrubbed(monkeypatch):
    monkeypatch.setenv("NANOR1_SECRET", "ENV-SECRET-123")
    status, out = S.run_program("import os, json\nprint(os.getcwd())\nprint(json.dumps(dict(os.environ)))", timeout=2)
    cwd, env = out.splitlines()
    assert status == "ok" and not os.path.exists(cwd)
    assert set(json.loads(env)) == {"PATH", "LANG", "HOME"} and "ENV-SECRET" not in env


# ----------------------------------------------------------------------------------------
# attacks, each layer alone and all together; the control run without layers shows the attack works


@pytest.mark.parametrize("layers", ONE_LAYER)
def test_cannot_read_canary(canary, layers):
    code = f"print(open({str(canary)!r}).read())"
    assert canary.read_text() in S.run_program(code, timeout=2, layers=())[1]  # control
    assert canary.read_text() not in S.run_program(code, timeout=2, layers=layers)[1]
    assert S.code_reward(fence(code), [{"input": "", "output": canary.read_text()}], timeout=2) == 0.0


@pytest.mark.parametrize("layers", ONE_LAYER)
def test_cannot_delete_or_write_beside_canary(canary, layers):
    beside = canary.parent / "planted.txt"
    remove, write = f"import os; os.remove({str(canary)!r})", f"open({str(beside)!r}, 'w').write('x')"
    S.run_program(remove, timeout=2, layers=layers)
    S.run_program(write, timeout=2, layers=layers)
    assert canary.exists() and not beside.exists()
    S.run_program(remove, timeout=2, layers=())  # control
    S.run_program(write, timeout=2, layers=())
    assert not canary.exists() and beside.exists()


@pytest.mark.parametrize("layers", ONE_LAYER)
def test_cannot_read_parent_environment(layers):
    with open("/proc/self/environ") as f:  # what we were started with is what /proc shows
        secret = max(f.read().split("\0"), key=len)
    code = "import os\nprint(open(f'/proc/{os.getppid()}/environ').read())"
    assert secret in S.run_program(code, timeout=2, layers=())[1]  # control
    assert secret not in S.run_program(code, timeout=2, layers=layers)[1]


DAEMON = """import os
if os.fork() == 0:
    os.setsid()  # leave the process group the parent kills
    os.close(1)  # and do not hold its stdout open
    os.execv("/bin/sh", ["sh", "-c", "sleep 20; : {marker}"])
print("forked")
"""


@pytest.mark.parametrize("layers", ONE_LAYER)
def test_no_process_outlives_the_run(layers):
    marker = "MARKER-" + uuid.uuid4().hex
    if ROOT:  # control: root ignores RLIMIT_NPROC, so without layers the daemon escapes
        assert S.run_program(DAEMON.format(marker=marker), timeout=2, layers=())[1] == "forked\n"
        for _ in range(50):
            time.sleep(0.1)
            if pids := survivors(marker):
                break
        for pid in pids:
            os.killpg(pid, signal.SIGKILL)  # the shell and its sleep
        assert pids
    # (Landlock alone lets the fork through but not the exec: nothing may be executed)
    S.run_program(DAEMON.format(marker=marker), timeout=2, layers=layers)
    time.sleep(0.5)
    assert survivors(marker) == []


@pytest.mark.skipif(not ROOT, reason="only root can fork in the sandbox, and only without layers")
def test_group_is_killed_even_after_a_normal_exit():
    marker = "MARKER-" + uuid.uuid4().hex
    code = DAEMON.format(marker=marker).replace("os.setsid()", "pass")  # stays in the group
    assert S.run_program(code, timeout=2, layers=())[1] == "forked\n"
    time.sleep(0.5)
    assert survivors(marker) == []


@pytest.mark.parametrize("code", ["import os; os.system('sleep 20 # {marker}')",
                                  "import subprocess; subprocess.Popen(['sleep', '20', '{marker}'])",
                                  "import os; os.posix_spawn('/bin/sleep', ['sleep', '20', '{marker}'], {{}})",
                                  "import ctypes; ctypes.CDLL(None).system(b'sleep 20 # {marker}')"])
def test_no_subprocess(code):
    marker = "MARKER-" + uuid.uuid4().hex
    code = code.format(marker=marker) + "\nprint('spawned')"
    assert S.code_reward(fence(code), [{"input": "", "output": "spawned"}], timeout=2) == 0.0
    time.sleep(0.3)
    assert survivors(marker) == []


def test_audit_hook_cannot_be_disarmed(canary):
    """The audit layer alone, against programs that go after the hook itself."""
    attacks = [
        # reach the hook's frame through a traceback and widen its temp dir to /
        "try:\n    open(P)\nexcept Exception as e:\n    tb = e.__traceback__\n    while tb.tb_next: tb = tb.tb_next\n"
        "    tb.tb_frame.f_locals['inside'].__closure__[0].cell_contents = '/'",
        # find the hook with the garbage collector
        "import gc\nfor f in gc.get_objects():\n    if getattr(f, '__name__', '') == 'hook':\n"
        "        f.__defaults__ = (int, isinstance, any, all, str, lambda *a: True)",
        # break the builtins and path functions a naive hook would call
        "import builtins, os.path\nbuiltins.any = lambda *a: True\nbuiltins.isinstance = lambda *a: False\n"
        "os.path.realpath = os.path.abspath = os.path.normpath = lambda p: '/tmp'",
        # a str subclass that lies about itself
        "class Q(str):\n    def startswith(self, *a): return True\n    def split(self, *a): return ['tmp']\nP = Q(P)",
        # relative path from a directory descriptor
        "import os\nfd = os.open('/', os.O_RDONLY)\nprint(os.read(os.open(P[1:], os.O_RDONLY, dir_fd=fd), 99))",
    ]
    for attack in attacks:
        code = f"P = {str(canary)!r}\ntry:\n" + "\n".join("    " + l for l in attack.splitlines()) + \
               "\nexcept Exception:\n    pass\nprint(open(P).read())"
        assert canary.read_text() not in S.run_program(code, timeout=2, layers=("audit",))[1], attack


# ----------------------------------------------------------------------------------------
# faking a pass


@pytest.mark.parametrize("code", ["exit()", "quit()", "import sys; sys.exit(0)", "import os; os._exit(0)",
                                  "raise SystemExit", "raise SystemExit(0)", "import sys; sys.stdout.close()"])
def test_exiting_early_is_no_pass(code):
    assert S.code_reward(fence(code), ADD, timeout=2) == 0.0
    assert S.code_reward(fence(code + "\ndef f(x): return x"), [{"fn_name": "f", "args": [1], "expected": 1}],
                         timeout=2) == 0.0


def test_monkeypatching_cannot_fake_a_pass():
    """The child holds its own output channel: patching json, print or atexit changes nothing.
    (A program that knew the answer could just return it; what it cannot do is learn it.)"""
    fakes = [
        "import builtins, json\njson.dumps = lambda *a, **k: '[1, 2]'\nbuiltins.print = lambda *a, **k: None\n"
        "def f(x): return None",
        "class Eq(list):\n    def __eq__(self, other): return True\n    __hash__ = None\ndef f(x): return Eq()",
        "import json\njson.loads = lambda *a, **k: [1, 2]\ndef f(x): return 'nope'",
        "import atexit, os\natexit.register(lambda: print('[1, 2]'))\ndef f(x): return 0",
    ]
    for code in fakes:
        assert S.code_reward(fence(code), [{"fn_name": "f", "args": [0], "expected": [1, 2]}], timeout=2) == 0.0, code


def test_expected_value_never_reaches_the_child():
    want = "EXPECTED-" + uuid.uuid4().hex
    code = """import os, re, sys
def f():
    seen = repr(sys.argv) + repr(dict(os.environ))
    for name in os.listdir('.'):
        seen += open(name, errors='replace').read()
    for path in ('/proc/self/cmdline', '/proc/self/environ', f'/proc/{os.getppid()}/cmdline'):
        try: seen += open(path, errors='replace').read()
        except OSError: pass
    found = re.findall(r'EXPECTED-[0-9a-f]{32}', seen)
    return found[0] if found else ''
"""
    assert S.code_reward(fence(code), [{"fn_name": "f", "args": [], "expected": want}], timeout=2) == 0.0


# ----------------------------------------------------------------------------------------
# resource exhaustion


def test_signal_ignoring_busy_loop_is_killed():
    code = "import signal\nfor s in (signal.SIGTERM, signal.SIGALRM, signal.SIGXCPU, signal.SIGINT):\n" \
           "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass"
    t = time.monotonic()
    assert S.run_program(code, timeout=1)[0] == "timeout"
    assert time.monotonic() - t < 4


def test_sleeping_forever_is_killed():
    t = time.monotonic()
    assert S.code_reward(fence("import time\ntime.sleep(100)"), ADD[:1], timeout=1) == 0.0
    assert time.monotonic() - t < 4


def test_stdout_flood_is_capped():
    tracemalloc.start()
    t = time.monotonic()
    status, out = S.run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", timeout=5)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert status == "overflow" and out == ""
    assert time.monotonic() - t < 3 and peak < 4 * S.CODE_OUTPUT_CAP


@pytest.mark.parametrize("code", ["def f(n): return f(n + 1)\nf(0)",
                                  "import sys\nsys.setrecursionlimit(10**9)\ndef f(n): return f(n + 1)\nf(0)"])
def test_infinite_recursion_fails(code):
    t = time.monotonic()
    assert S.run_program(code, timeout=1)[0] in ("error", "timeout")  # RecursionError, or out of memory or time
    assert time.monotonic() - t < 4


def test_memory_bomb_fails_in_the_child():
    t = time.monotonic()
    status, out = S.run_program("x = bytearray(10 * 1024**3)\nprint('allocated')", timeout=2)
    assert status == "error" and "allocated" not in out and time.monotonic() - t < 2


def test_file_size_is_capped():
    code = """import os, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get an error instead of being killed
try:
    with open('big.bin', 'wb') as f:
        for _ in range(64):
            f.write(b'x' * 2**20)
except OSError:
    pass
print(os.path.getsize('big.bin'))
"""
    status, out = S.run_program(code, timeout=2)
    assert status == "ok" and int(out) <= S.CODE_FILE_CAP


def test_open_files_are_capped():
    code = "files = []\ntry:\n    for i in range(1000):\n        files.append(open(f'f{i}', 'w'))\n" \
           "except OSError:\n    pass\nprint(len(files))"
    status, out = S.run_program(code, timeout=2)
    assert status == "ok" and int(out) < S.CODE_NUM_FILES


def test_importing_the_rewards_makes_no_thread_pool_until_a_test_runs():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = ("import sys\n"
              f"sys.path.insert(0, {root!r})\n"
              "import rewards\n"
              "from nanor1 import sandbox\n"
              "print(sandbox._pool is None)\n"
              "print(rewards.code('```python\\nprint(1)\\n```', {'tests': [{'input': '', 'output': '1'}]}))\n"
              "print(sandbox._pool is not None)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "1.0", "True"], out.stderr
