"""`make up`'s text-generation demo through the local stack: the tiny Llama pool and the tenants' chat
adapters that `Stack.chat_demo` builds, pushes and applies, asked as a user would (the `openai` client
through the ingress and the pool's gateway, each tenant with its own key): each answers its own reply,
the base model none of them, and the snippet and script the demo prints work as printed."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import openai
import pytest

from lorafleet.localstack.stack import CHAT_POOL, CHAT_PROMPT, CHAT_TENANTS, NAMESPACE, _chat_snippet


@pytest.fixture(scope="module")
def chat_demo(e2e):
    answers = e2e.stack.chat_demo(e2e.state)
    yield answers
    # Its pods would otherwise keep polling through the rest of the tier.
    e2e.kubectl("delete", "lora,lfpool", "--all", "-n", NAMESPACE, "--wait=false")


def ask(base_url: str, key: str, model: str) -> str:
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30)
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": CHAT_PROMPT}],
                                       max_tokens=32, temperature=0)
    return r.choices[0].message.content


def test_make_ups_chat_demo_answers_each_tenant_with_its_own_adapter(e2e, chat_demo):
    base_url = f"http://127.0.0.1:{e2e.state['chat_port']}/v1"
    keys = e2e.state["api_keys"]
    got = {name: ask(base_url, keys[tenant], name) for tenant, name, _ in CHAT_TENANTS}
    assert got == {name: reply for _, name, reply in CHAT_TENANTS}
    base = ask(base_url, keys["acme"], CHAT_POOL)
    assert base not in got.values(), base
    assert chat_demo == {CHAT_POOL: base, **got}  # what `make up` printed
    with pytest.raises(openai.PermissionDeniedError) as refused:  # another tenant's adapter
        ask(base_url, keys["acme"], "globex-chat")
    assert refused.value.code == "adapter_forbidden", refused.value.body

    tenant, name, reply = CHAT_TENANTS[1]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(_chat_snippet(base_url, keys[tenant], name), {})
    assert printed.getvalue() == reply + "\n"
    script = subprocess.run([sys.executable, str(e2e.stack.chat_script)], capture_output=True, text=True, timeout=60)
    assert script.returncode == 0, script.stderr
    lines = script.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [CHAT_POOL, *(n for _, n, _ in CHAT_TENANTS)]
    assert all(repr(r) in line for line, (_, _, r) in zip(lines[1:], CHAT_TENANTS))
