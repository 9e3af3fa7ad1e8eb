"""The code sandbox: run a completion's last Python block against test cases.

Tests are a list (or a JSON string of a list) of either
    {"input": str, "output": str}                   a stdin/stdout program, or
    {"fn_name": str, "args": list, "expected": any}  a function, called as fn(*args)
(looked up at top level, then as a method of a LeetCode-style Solution class). The child
prints the JSON of its result as its last line and the parent compares, so expected values
never enter the child. Each run is a fresh `python -I -S -B` process in a new session and
its own temporary directory, with an empty environment and rlimits, killed as a group when
it ends. A fixed bootstrap sets the limits, then adds layers that each stop what the others
miss: dropping root, Landlock, and an audit hook.

code_reward(completion, tests) is what rewards.py's code rules call; code_rewards scores
many completions at once, every test of every completion in one thread pool.

Deliberate simplifications: processes, rlimits and an audit hook (plus Landlock where the
kernel has it), not a container; no threads in the child (RLIMIT_NPROC 0), no
site-packages (-S), stderr discarded, a run passes only with exit code 0.
"""

import json
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

CODE_TIMEOUT = 5.0  # wall-clock seconds per test run (CPU time is capped 1 s later, as a backstop)
CODE_MEMORY = 1 << 30  # address space of a run, bytes: a 10 GB allocation fails in the child
CODE_OUTPUT_CAP = 1 << 20  # stdout bytes read from a run; more is a failure, never buffered
CODE_FILE_CAP = 16 << 20  # largest file a run may write, bytes
CODE_NUM_FILES = 64  # open file descriptors per run
NOBODY = 65534  # uid/gid a root parent drops its children to
SANDBOX_LAYERS = ("drop", "landlock", "audit")  # all on; tests switch them one at a time
PYTHON = sys.executable
# one run per core: more would only make CPU-bound programs hit the wall-clock timeout
CODE_WORKERS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

_pool, _pool_lock = None, threading.Lock()


def code_pool():
    """The threads test runs go to, made on first use (importing this file starts nothing).
    Only ever runs run_test, which never waits on the pool."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(CODE_WORKERS)
    return _pool


# ----------------------------------------------------------------------------------------
# the child: a fixed bootstrap that reads job.json and main.py from its working directory

BOOTSTRAP = r'''
import json, os, resource, struct, sys
def main():
    job, src = json.load(open("job.json")), open("main.py").read()
    tmp, layers, root = os.getcwd(), job["layers"], os.getuid() == 0
    # limits first, while we may still set them: time, memory, file size, descriptors, no
    # fork and no threads (RLIMIT_NPROC 0), no core dumps
    for name, value in job["limits"].items():
        limit = getattr(resource, name)
        hard = resource.getrlimit(limit)[1]  # a lower hard limit than ours stays: it cannot be raised
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(limit, (value, value))
    if "drop" in layers and root:
        # Python may sit where nobody cannot enter (/root/.pyenv): keep its library reachable
        # through descriptors opened while still root, in sys.path and in loaded packages
        fds = {p: "/proc/self/fd/%d" % os.open(p, os.O_PATH) for p in sys.path if os.path.isdir(p)}
        reach = lambda path: next((f + path[len(p):] for p, f in fds.items() if path.startswith(p + "/")), path)
        for m in list(sys.modules.values()):
            if isinstance(getattr(m, "__path__", None), list):
                m.__path__[:] = map(reach, m.__path__)
        sys.path = list(fds.values())
    if "landlock" in layers:
        try:  # enforced by the kernel: holds even if the audit hook is bypassed
            landlock(job["ro"], tmp)
        except OSError:
            pass  # kernel without Landlock: the other layers still hold
    if "drop" in layers and root:
        # root ignores RLIMIT_NPROC, may raise any limit and read every file: become nobody
        os.setgroups([]), os.setgid(job["nobody"]), os.setuid(job["nobody"])
    if "audit" in layers:
        # documented as no security boundary, so one layer of several; but it sees every
        # open, spawn and socket of the interpreter, even without root or Landlock
        sys.addaudithook(make_hook(tmp, job["ro"] + sys.path))
    g = {"__name__": "__main__" if job["fn_name"] is None else "solution", "__builtins__": __builtins__,
         "exit": sys.exit, "quit": sys.exit}  # what site (left out by -S) defines: exit() ends with code 0
    out, dumps, exit_now = sys.stdout, json.dumps, os._exit  # held: the program may replace them
    exec(compile(src, "main.py", "exec"), g)
    if job["fn_name"] is not None:
        fn = g.get(job["fn_name"]) or getattr(g["Solution"](), job["fn_name"])
        result = dumps(fn(*job["args"]))
        out.write("\n" + result + "\n"), out.flush()
        exit_now(0)  # no atexit hook or finaliser of the program may print after the result

def landlock(ro, rw):
    """Read-only access to ro, read-write to rw, nothing else; TCP and signals out of the domain refused."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    syscall = libc.syscall
    def check(r):
        if r < 0:
            raise OSError(ctypes.get_errno(), "landlock")
        return r
    abi = check(syscall(444, None, 0, 1))  # landlock_create_ruleset(VERSION): the ABI
    fs = (1 << (13, 14, 15, 15, 16)[min(abi, 5) - 1]) - 1  # every fs right this ABI knows: all handled
    # handled fs rights, TCP bind+connect (ABI 4), scoping of abstract sockets+signals (ABI 6)
    attr = struct.pack("QQQ", fs, 3, 3)[:8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = check(syscall(444, attr, len(attr), 0))
    read, write = 1 << 2 | 1 << 3, 1 << 1 | 1 << 4 | 1 << 5 | 1 << 7 | 1 << 8 | 1 << 14  # no exec, no links
    for path, rights in [(p, read) for p in ro] + [(rw, read | write)]:
        fd = os.open(path, os.O_PATH)
        if not os.path.isdir(path):
            rights = 1 << 2  # a single file can only be given file rights
        check(syscall(445, ruleset, 1, struct.pack("=Qi", rights & fs, fd), 0))  # add_rule(PATH_BENEATH)
        os.close(fd)
    check(libc.prctl(38, 1, 0, 0, 0))  # NO_NEW_PRIVS, required first
    check(syscall(446, ruleset, 0))  # restrict_self
    os.close(ruleset)

def make_hook(tmp, ro):
    """An audit hook that refuses processes, sockets, native code, new limits and files
    outside tmp (read-only in ro). Everything it uses is bound now, out of the program's reach."""
    # processes and signals; sockets; native code; limits; the garbage collector and tracebacks'
    # frames, which lead to this hook; hand-made code objects; links; moving away from tmp
    deny = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.kill", "signal.pthread_kill",
            "subprocess.", "socket.", "ctypes.", "resource.", "gc.get_", "object.__getattr__", "code.__new__",
            "os.symlink", "os.link", "os.chdir")
    # fork_exec without an audit event, ctypes, memory-corrupting test helpers, and
    # subinterpreters, which would start without this hook
    native = ("_posixsubprocess", "_ctypes", "_test", "_xxsub")
    paths = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.truncate", "os.chmod", "os.chown",
             "os.utime", "shutil.rmtree")
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    def plain(path, bytes=bytes, isinstance=isinstance):
        # the exact characters, whatever str or bytes subclass was passed (no method of it is called)
        if isinstance(path, bytes):
            return b"".join((path,)).decode("utf-8", "surrogateescape")
        return "".join((path,))  # anything else (PathLike, ...) raises, which refuses the event
    def inside(path, dirs, any=any):
        # lexical normalisation with str methods only: nothing the program can monkeypatch
        parts = []
        for part in (path if path.startswith("/") else tmp + "/" + path).split("/"):
            if part == "..":
                parts = parts[:-1]
            elif part not in ("", "."):
                parts.append(part)
        path = "/" + "/".join(parts)
        return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)
    def hook(event, args, int=int, isinstance=isinstance, any=any, all=all, plain=plain, inside=inside):
        if event.startswith(deny) or event == "import" and plain(args[0]).startswith(native):
            raise PermissionError("sandbox: " + event)
        if event == "object.__setattr__" and any(args[0] is f for f in (hook, plain, inside)):
            raise PermissionError("sandbox: " + event)  # would rewrite this hook
        if event == "open" and not isinstance(args[0], int):
            path, mode, flags = plain(args[0]), args[1], args[2]
            if mode is None and not path.startswith("/"):
                raise PermissionError("sandbox: relative os.open")  # may carry a dir_fd we cannot see
            if not (inside(path, [tmp]) or flags & writing == 0 and inside(path, ro)):
                raise PermissionError("sandbox: open " + path)
        if event in paths:
            targets = args[:2] if event == "os.rename" else args[:1]
            if event != "os.truncate" and args[-1] is not None:
                raise PermissionError("sandbox: dir_fd")
            if not all(isinstance(a, int) or inside(plain(a), [tmp]) for a in targets):
                raise PermissionError("sandbox: " + event)
    return hook

main()
'''

# read-only for the child: the Python installation and the shared libraries it may load
READ_ONLY = sorted({sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, os.path.dirname(os.__file__)}
                   | {p for p in ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/etc/ld.so.cache", "/dev/null")
                      if os.path.exists(p)})

# ----------------------------------------------------------------------------------------
# the parent: run one program, read its output with a cap, kill its process group


def run_program(code, stdin="", fn_name=None, args=(), timeout=CODE_TIMEOUT, layers=SANDBOX_LAYERS):
    """Run code in the sandbox -> (status, stdout): status is "ok" (exit code 0), "error",
    "timeout" or "overflow" (more than CODE_OUTPUT_CAP bytes). With fn_name, stdout's last line
    is the JSON of fn_name(*args)."""
    tmp = tempfile.mkdtemp(prefix="nanor1-")
    try:
        limits = {"RLIMIT_CPU": math.ceil(timeout) + 1, "RLIMIT_AS": CODE_MEMORY, "RLIMIT_FSIZE": CODE_FILE_CAP,
                  "RLIMIT_NOFILE": CODE_NUM_FILES, "RLIMIT_NPROC": 0, "RLIMIT_CORE": 0}
        job = {"layers": list(layers), "limits": limits, "ro": READ_ONLY, "nobody": NOBODY,
               "fn_name": fn_name, "args": list(args)}
        for name, text in [("main.py", code), ("job.json", json.dumps(job)), ("stdin.txt", stdin)]:
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        if os.geteuid() == 0:
            os.chown(tmp, NOBODY, NOBODY)  # the child drops to nobody and works in here
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": tmp}  # nothing of ours inherited
        with open(os.path.join(tmp, "stdin.txt")) as fin:
            # -I: no environment, no user site, no script dir on sys.path; -S: no site-packages;
            # -B: no .pyc written; new session: one process group to kill (no preexec_fn)
            proc = subprocess.Popen([PYTHON, "-I", "-S", "-B", "-c", BOOTSTRAP], stdin=fin, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, cwd=tmp, env=env, start_new_session=True)
        try:
            status, out = read_capped(proc.stdout, time.monotonic() + timeout)
        finally:
            # kill the group before reaping the leader, so its pid (the group id) cannot have
            # been reused; also reaches anything the program left running in its group
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.stdout.close()
            returncode = proc.wait()
        if status == "ok" and returncode != 0:
            status = "error"
        return status, out.decode("utf-8", "replace")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_capped(stdout, deadline):
    """Read a pipe until EOF -> ("ok", bytes); ("timeout" | "overflow", b"") when the deadline
    passes or CODE_OUTPUT_CAP is exceeded. Never holds more than CODE_OUTPUT_CAP bytes."""
    chunks, size = [], 0
    with selectors.DefaultSelector() as sel:
        sel.register(stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout", b""
            if not sel.select(left):
                continue
            data = os.read(stdout.fileno(), 1 << 16)
            if not data:  # EOF: the program and everything holding its stdout are done
                return "ok", b"".join(chunks)
            size += len(data)
            if size > CODE_OUTPUT_CAP:
                return "overflow", b""
            chunks.append(data)


# ----------------------------------------------------------------------------------------
# the reward


FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", flags=re.DOTALL | re.MULTILINE)


def extract_code(completion):
    """The last fenced Python block (```python, ```py or a bare ```) after the last </think>; None if absent."""
    text = completion.rsplit("</think>", 1)[-1]
    blocks = [body for lang, body in FENCE.findall(text) if lang.lower() in ("", "python", "py", "python3")]
    return blocks[-1] if blocks else None


def lines(text):
    """Output lines without trailing whitespace, trailing empty lines dropped."""
    out = [line.rstrip() for line in text.split("\n")]
    while out and not out[-1]:
        out.pop()
    return out


def same_json(got, want):
    """JSON equality without Python's looseness (True == 1); floats within 1e-6."""
    if isinstance(got, bool) or isinstance(want, bool):
        return got is want
    if isinstance(got, int) and isinstance(want, int):
        return got == want
    if isinstance(got, (int, float)) and isinstance(want, (int, float)):
        return math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6)
    if isinstance(got, list) and isinstance(want, (list, tuple)):
        return len(got) == len(want) and all(same_json(g, w) for g, w in zip(got, want))
    if isinstance(got, dict) and isinstance(want, dict):
        return got.keys() == want.keys() and all(same_json(got[k], want[k]) for k in got)
    return type(got) is type(want) and got == want  # str, None


def run_test(code, test, timeout=CODE_TIMEOUT):
    """True when the program passes one test; the expected value stays in the parent."""
    if "fn_name" in test:
        status, out = run_program(code, fn_name=test["fn_name"], args=test.get("args", []), timeout=timeout)
        try:
            return status == "ok" and same_json(json.loads(lines(out)[-1]), test["expected"])
        except (ValueError, IndexError, RecursionError, OverflowError):  # no result, or not JSON
            return False
    status, out = run_program(code, stdin=test.get("input", ""), timeout=timeout)
    return status == "ok" and lines(out) == lines(test["output"])


def code_rewards(completions, tests_list, timeout=CODE_TIMEOUT, strict=False):
    """code_reward of many completions at once: every test of every completion goes to the pool together,
    so a GRPO group runs in parallel. Do not call from inside the pool (it would wait on itself)."""
    jobs = []
    for completion, tests in zip(completions, tests_list):
        code = extract_code(completion)
        tests = json.loads(tests) if isinstance(tests, str) else tests
        jobs.append([code_pool().submit(run_test, code, t, timeout) for t in tests] if code and tests else [])
    rewards = []
    for futures in jobs:
        frac = sum(f.result() for f in futures) / len(futures) if futures else 0.0
        rewards.append(float(frac == 1.0) if strict else frac)
    return rewards


def code_reward(completion, tests, timeout=CODE_TIMEOUT, strict=False):
    """Fraction of tests the completion's last Python block passes (strict: 1 only if all pass).
    No code block or no tests -> 0."""
    return code_rewards([completion], [tests], timeout=timeout, strict=strict)[0]
