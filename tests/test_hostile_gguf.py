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
import tracemalloc

import pytest

from tiny_gguf import CRAFTED, write_tiny_model
from w2s_langchain.engine import load_model
from w2s_langchain.errors import ChatTemplateError
from w2s_langchain.prompts import PromptFormat, render

SECONDS = 2.0  # each refusal comes within this
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

LOAD_EACH = """
import json, resource, sys, time
from w2s_langchain.engine import load_model
from w2s_langchain.engine.model import _init_backend
_init_backend()  # once per process, and slow on a busy machine: not part of any file's time

def peak_bytes():
    # Linux's VmHWM is this process's own peak; ru_maxrss survives exec, so there it
    # would report the (larger) peak of the test process that started this one.
    try:
        with open("/proc/self/status") as status:
            return int(next(l for l in status if l.startswith("VmHWM")).split()[1]) * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

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
EATS_MEMORY = {
    "repeating a string": "{{ 'x' * 10**10 }}",
    "repeating a list": "{{ messages * 10**9 }}",
    "a huge power": "{{ 2 ** 1000000000 }}",
    "a huge join": "{{ range(10**5)|join('x' * 10**5) }}",
    "a huge join, reversed": "{{ range(10**5)|reverse|join('x' * 10**5) }}",
    "a huge str.join": "{{ ('x' * 10**5).join(range(10**3)|map('string')) }}",
    "a wide % format": "{{ '%9999999999s' % '' }}",
    "a wide format filter": "{{ '%9999999999s'|format('') }}",
    "a wide str.format": "{{ '{:9999999999}'.format('') }}",
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
HOSTILE = REACHES_FOR_PYTHON | RUNS_FOREVER | EATS_MEMORY
CAUSE = {  # what the error says, by kind of harm
    **dict.fromkeys(REACHES_FOR_PYTHON, "reaches for Python internals|'lipsum' is undefined"),
    **dict.fromkeys(RUNS_FOREVER, "runs longer than 1 s|recurses too deeply|characters long, more than the 100,000"),
    **dict.fromkeys(EATS_MEMORY, "builds more than 32,000,000 characters"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_chat_template_is_refused_without_running_code(tmp_path, case):
    canary = tmp_path / "canary"
    template = HOSTILE[case].replace("CANARY", str(canary))
    model = load_model(write_tiny_model(tmp_path / "hostile.gguf", vocab="ab", seed=1, chat_template=template))
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ChatTemplateError, match=r"chat template of hostile\.gguf is unusable") as refused:
            render(model, PromptFormat(format="chat"), "Hi")
        seconds, (_, peak) = time.perf_counter() - started, tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seconds < SECONDS and peak < PEAK_BYTES
    assert not canary.exists()
    assert re.search(CAUSE[case], str(refused.value))
    assert 'format "plain"' in str(refused.value)  # says how to go on
    # ...and the way out it names works: the same file, plain text.
    assert render(model, PromptFormat(), "Hi").plain == "Hi"
