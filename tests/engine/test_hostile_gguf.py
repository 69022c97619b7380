"""Model files crafted to be wrong, and chat templates crafted to harm.

Either way the answer is a clear error (a `W2SError`) saying what is wrong, in
bounded time and memory, and no code of the file's author runs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.loop_ticker import run_watching_the_loop
from support.tiny_gguf import CRAFTED, write_tiny_model
from w2s_langchain.errors import ChatTemplateError, SearchTimeoutError
from w2s_langchain.llms import W2SAlignedLLM

SECONDS = 2.0  # each refusal comes within this (CPU seconds of the thread, for renders)
PEAK_BYTES = 256 * 2**20  # and builds at most this much

# --- crafted files -------------------------------------------------------------------
# llama.cpp aborts the whole process (GGML_ASSERT) on some of these unless the
# loader's header check refuses them first, so they are loaded in a child process:
# a regression fails these tests instead of killing the test run.

EXPECTED = {
    "bad magic": "not a GGUF file",
    "version 999": "version 999",
    "tensor count 2**60": "corrupt or truncated: .* tensors",
    "tensor count beyond the file": "corrupt or truncated: .* tensors",
    "key count 2**60": "corrupt or truncated: .* metadata keys",
    "key count beyond the file": "corrupt or truncated: .* metadata keys",
    "key length 2**60": "corrupt or truncated: a metadata key",
    "string length 2**60": "corrupt or truncated: general.name",
    "chat template length 2**60": "corrupt or truncated: tokenizer.chat_template",
    "string length beyond the file": "corrupt or truncated: general.name",
    "token count 2**60": "corrupt or truncated: tokenizer.ggml.tokens",
    "token count beyond the file": "corrupt or truncated: tokenizer.ggml.tokens",
    "token type count 2**60": "corrupt or truncated: tokenizer.ggml.token_type",
    "unknown value type": "unknown value type 77",
    "unknown array type": "array of unknown type 77",
    "cut in the header": "corrupt or truncated",
    "cut in the metadata": "corrupt or truncated",
    "tensor dimension 2**60": "incorrect shape",
    "tensor data offset past the end": "has offset",
    "cut in the tensor data": "not within the file bounds",
    "a million layers": "1,000,000 layers .*would abort",
    "no layers": "0 layers .*would abort",
    "a million experts": "1,000,000 experts .*would abort",
    "more experts used than there are": "8 experts used .* out of 4.*would abort",
    "a token twice in the vocabulary": "token .* twice .*would abort",
}

PEAK_BYTES_IN_CHILD = """
import json, resource, sys, time
from w2s_langchain.engine import load_model
from w2s_langchain.engine.model import _init_backend
_init_backend()  # once per process, and slow on a busy machine: not part of any case's time

def peak_bytes():
    # Linux's VmHWM is this process's own peak; ru_maxrss survives exec, so there it
    # would report the (larger) peak of the test process that started this one.
    try:
        with open("/proc/self/status") as status:
            return int(next(l for l in status if l.startswith("VmHWM")).split()[1]) * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

def reset_peak():
    # Linux resets VmHWM to the current RSS on "5" (so each case's peak is its own);
    # elsewhere the peak only grows, which still bounds every case.
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass
"""

LOAD_EACH = PEAK_BYTES_IN_CHILD + """
for path in sys.argv[1:]:
    print(json.dumps({"loading": path}), flush=True)  # the last words, should llama.cpp abort
    started = time.perf_counter()
    try:
        load_model(path)
        error, message = None, ""
    except Exception as err:
        error, message = type(err).__name__, str(err)
    peak = peak_bytes()
    print(json.dumps({"path": path, "error": error, "message": message,
                      "seconds": time.perf_counter() - started, "peak_bytes": peak}), flush=True)
"""


@pytest.fixture(scope="module")
def crafted_outcomes(tmp_path_factory, tiny_models) -> dict[str, dict]:
    """What loading each crafted file (and, as a control, a sound one) gave, loaded
    one after the other in one child process."""
    pytest.importorskip("resource")  # the child measures its memory with it (not on Windows)
    folder = tmp_path_factory.mktemp("crafted")
    paths = {name: str(write(folder / f"{i}.gguf")) for i, (name, write) in enumerate(CRAFTED.items())}
    paths["sound"] = str(tiny_models.tiny_a)
    child = subprocess.run(
        [sys.executable, "-c", LOAD_EACH, *paths.values()], capture_output=True, text=True, timeout=120
    )
    lines = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
    names = {path: name for name, path in paths.items()}
    last = names[lines[-1]["loading"]] if lines and "loading" in lines[-1] else None
    died = f"the process died (code {child.returncode}) loading {last!r}:\n{child.stderr[-2000:]}"
    assert child.returncode == 0, died
    return {names[line["path"]]: line for line in lines if "path" in line}


def test_every_crafted_file_has_an_expectation():
    assert set(EXPECTED) == set(CRAFTED)


def test_a_sound_file_loads_in_the_same_process(crafted_outcomes):
    assert crafted_outcomes["sound"]["error"] is None


@pytest.mark.parametrize("flaw", list(CRAFTED))
def test_a_crafted_file_is_refused_clearly_quickly_and_cheaply(crafted_outcomes, flaw):
    outcome = crafted_outcomes[flaw]
    assert outcome["error"] == "ModelLoadError"
    assert re.search(EXPECTED[flaw], outcome["message"]), outcome["message"]
    assert outcome["seconds"] < SECONDS
    assert outcome["peak_bytes"] < PEAK_BYTES


# --- hostile chat templates ------------------------------------------------------------
# "CANARY" stands for a file the template would create if it ever ran code.

REACHES_FOR_PYTHON = {
    "a string's class and its bases": "{{ ''.__class__.__mro__ }}",
    "cycler's globals": "{{ cycler.__init__.__globals__ }}",
    "the template's own context": "{{ self._TemplateReference__context }}",
    "os, through joiner": "{{ joiner.__init__.__globals__.os.system('touch CANARY') }}",
    "os, through lipsum": "{{ lipsum.__globals__['os'].popen('touch CANARY') }}",
    "os, through namespace": "{{ namespace.__init__.__globals__['os'].system('touch CANARY') }}",
    "raise_exception's globals": "{{ raise_exception.__globals__['__builtins__']['open']('CANARY', 'w') }}",
    "the attr filter": "{{ ''|attr('__class__')|attr('__subclasses__') }}",
    "a format string's fields": "{{ '{0.__class__.__mro__}'.format('') }}",
    "changing a list": "{% set _ = messages.append({'role': 'user', 'content': 'x'}) %}",
}
RUNS_FOREVER = {
    "nested range loops": "{% for i in range(10**5) %}{% for j in range(10**5) %}{% endfor %}{% endfor %}",
    "nested range loops with output": "{% for i in range(10**5) %}{% for j in range(10**5) %}x{% endfor %}{% endfor %}",
    "nested loops over a long string": "{% for a in 'x' * 10**5 %}{% for b in 'x' * 10**5 %}{% endfor %}{% endfor %}",
    "a macro that calls itself": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "a macro that calls itself twice": (
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}"
    ),
    "deeply nested brackets": "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
    "a template of 210,000 characters": "{{ 1 }}" * 30_000,
}
HOLDS_THE_GIL = {  # one C call on big integers: no clock is looked at while it runs
    "big-integer division": "{% set a = 10**2000000 %}{% set b = 3**1000000 %}{{ (a // b) % 7 }}",
    "a power of a big integer": "{% set a = 10**2000000 %}{{ (a ** 3) % 7 }}",
    "a big product": "{% set a = 7**400000 %}{{ (a * a * a * a) % 7 }}",
}
EATS_MEMORY = {
    "repeating a string": "{{ 'x' * 10**10 }}",
    "joining bytes": "{% set b = ('x' * 1000).encode() %}{% set c = b.join([b] * 300) %}{{ c.join([c] * 300)|length }}",
    "translating each character into a long string": "{{ ('a' * 300).translate({97: 'x' * 10**6})|length }}",
    "repeating a list": "{{ messages * 10**9 }}",
    "a huge power": "{{ 2 ** 1000000000 }}",
    "a huge join": "{{ range(10**5)|join('x' * 10**5) }}",
    "a huge join, reversed": "{{ range(10**5)|reverse|join('x' * 10**5) }}",
    "a huge str.join": "{{ ('x' * 10**5).join(range(10**3)|map('string')) }}",
    "a wide % format": "{{ '%9999999999s' % '' }}",
    "a wide format filter": "{{ '%9999999999s'|format('') }}",
    "a wide str.format": "{{ '{:9999999999}'.format('') }}",
    "a width given as an argument": "{{ ('%*s' % (3000000000, 'a'))|length }}",
    "a nested str.format width": "{{ '{0[0]:>{0[1]}}'.format(['a', 10**9])|length }}",
    "a nested width in format_map": "{{ '{a:>{w}}'.format_map({'a': 'x', 'w': 10**9})|length }}",
    "a wide center": "{{ 'x'|center(10**10) }}",
    "indenting many lines": "{{ ('\\n' * 10**6)|indent(1000) }}",
    "replacing every gap": "{{ ('x' * 10**6)|replace('', 'y' * 1000) }}",
    "expanding many tabs": "{{ ('\\t' * 10**6).expandtabs(1000) }}",
    "doubling with ~": "{% set a = 'x' * 10**6 %}" + "{% set a = a ~ a %}" * 40 + "{{ a|length }}",
    "doubling in set blocks": "{% set a = 'x' * 10**6 %}" + "{% set a %}{{ a }}{{ a }}{% endset %}" * 40,
    "doubling in a namespace": (
        "{% set ns = namespace(s='x') %}{% for i in range(100) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}"
    ),
    "long literal text in a macro loop": (
        "{% macro m() %}{% for i in range(10**5) %}" + "y" * 50_000 + "{% endfor %}{% endmacro %}{{ m() }}"
    ),
}
HOSTILE = REACHES_FOR_PYTHON | RUNS_FOREVER | HOLDS_THE_GIL | EATS_MEMORY
CAUSE = {  # what the error says, by kind of harm
    **dict.fromkeys(REACHES_FOR_PYTHON, "reaches for Python internals|'lipsum' is undefined"),
    **dict.fromkeys(RUNS_FOREVER, "runs longer than 1 s|recurses too deeply|characters long, more than the 100,000"),
    **dict.fromkeys(HOLDS_THE_GIL, "integers of more than 4,000 digits"),
    **dict.fromkeys(EATS_MEMORY, "builds more than 32,000,000 characters|integers of more than 4,000 digits"),
}

RENDER_EACH = PEAK_BYTES_IN_CHILD + """
from w2s_langchain.prompts import PromptFormat, render

for case, path in json.loads(sys.argv[1]).items():
    model = load_model(path)
    print(json.dumps({"rendering": case}), flush=True)  # the last words, should the process die
    reset_peak()
    started = time.thread_time()  # the render's own work: what is bounded, however busy the machine
    try:
        render(model, PromptFormat(format="chat"), "Hi")
        error, message = None, ""
    except Exception as err:
        error, message = type(err).__name__, str(err)
    seconds, peak = time.thread_time() - started, peak_bytes()
    plain = render(model, PromptFormat(), "Hi").plain  # the way out the error names
    print(json.dumps({"case": case, "error": error, "message": message, "seconds": seconds,
                      "peak_bytes": peak, "plain": plain}), flush=True)
"""


@pytest.fixture(scope="module")
def template_outcomes(tmp_path_factory) -> tuple[dict[str, dict], Path]:
    """What rendering each hostile template gave, rendered one after the other in one
    child process (which measures its own time and peak memory), and the folder
    where a template that ran code would have left its canary file."""
    pytest.importorskip("resource")
    folder = tmp_path_factory.mktemp("templates")
    paths = {}
    for i, (case, template) in enumerate(HOSTILE.items()):
        template = template.replace("CANARY", str(folder / f"canary{i}"))
        paths[case] = str(write_tiny_model(folder / f"{i}.gguf", vocab="ab", seed=1, chat_template=template))
    child = subprocess.run(
        [sys.executable, "-c", RENDER_EACH, json.dumps(paths)], capture_output=True, text=True, timeout=600
    )
    lines = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
    last = lines[-1].get("rendering") if lines else None
    assert child.returncode == 0, f"the process died (code {child.returncode}) rendering {last!r}:\n{child.stderr[-2000:]}"
    return {line["case"]: line for line in lines if "case" in line}, folder


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_chat_template_is_refused_without_running_code(template_outcomes, case):
    outcomes, folder = template_outcomes
    outcome = outcomes[case]
    assert outcome["error"] == "ChatTemplateError"
    assert re.search(r"chat template of \d+\.gguf is unusable", outcome["message"])
    assert outcome["seconds"] < SECONDS, f"{outcome['seconds']:.1f} s"
    assert outcome["peak_bytes"] < PEAK_BYTES, f"peak {outcome['peak_bytes'] / 2**20:.0f} MB"
    assert not list(folder.glob("canary*"))
    assert re.search(CAUSE[case], outcome["message"]), outcome["message"]
    assert 'format "plain"' in outcome["message"]  # says how to go on
    assert outcome["plain"] == "Hi"  # ...and the way out it names works: the same file, plain text


def aligned_llm(tiny_models, weak, **fields) -> W2SAlignedLLM:
    """The tiny models, the weak one shown the prompt through its chat template."""
    return W2SAlignedLLM(
        strong=str(tiny_models.tiny_a), weak=str(weak), weak_ref=str(tiny_models.tiny_b),
        strong_prompt={"format": "plain"}, weak_prompt={"format": "chat"}, weak_ref_prompt={"format": "plain"},
        iterations=2, n_ctx=512, n_threads=1, **fields,
    )


@pytest.mark.parametrize("case", ["big-integer division", "nested range loops"])
def test_an_async_caller_keeps_its_event_loop_while_a_template_is_refused(tiny_models, tmp_path, case):
    hostile = write_tiny_model(tmp_path / "hostile.gguf", vocab="ab", seed=1, chat_template=HOSTILE[case])
    llm = aligned_llm(tiny_models, hostile)

    async def refused():
        started = time.perf_counter()
        with pytest.raises(ChatTemplateError):
            await llm.ainvoke("Once")
        return time.perf_counter() - started

    seconds, ticks, longest_stall = run_watching_the_loop(refused)
    assert seconds < SECONDS + 1  # the render's bound, plus loading the tiny models
    assert longest_stall < SECONDS / 4, f"the event loop stood still for {longest_stall:.2f} s ({ticks} ticks)"


def test_a_template_renders_within_the_searchs_timeout(tiny_models, tmp_path):
    hostile = write_tiny_model(tmp_path / "slow.gguf", vocab="ab", seed=1, chat_template=HOSTILE["nested range loops"])
    untimed, timed = aligned_llm(tiny_models, hostile), aligned_llm(tiny_models, hostile, timeout=0.3)
    with pytest.raises(ChatTemplateError, match="runs longer than 1 s"):  # and the models are loaded
        untimed.invoke("Once")
    started = time.perf_counter()
    with pytest.raises(SearchTimeoutError, match="while rendering a chat template"):
        timed.invoke("Once")
    assert time.perf_counter() - started < 0.3 + 0.3  # not the template's own bound of 1 s
