"""`moerun serve` through the official `openai` Python package (issue 5). Run by .ci/run.

Usage: python openai_e2e.py BASE_URL API_KEY     (BASE_URL like http://127.0.0.1:PORT/v1)
"""

import sys

import openai
from openai import OpenAI

base_url, api_key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key=api_key, timeout=60, max_retries=0)
passed = 0

model = client.models.list().data[0].id
question = [{"role": "user", "content": "What is a trait?"}]

# Without streaming.
r = client.chat.completions.create(model=model, messages=question, temperature=0, max_tokens=40)
text = r.choices[0].message.content
assert r.choices[0].message.role == "assistant" and text, r
assert r.choices[0].finish_reason in ("stop", "length"), r
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 0, r.usage
print(f"non-streaming: {text!r}")
passed += 1

# With streaming: content arrives in several chunks and ends with a finish reason.
stream = client.chat.completions.create(model=model, messages=question, temperature=0, max_tokens=40, stream=True)
pieces, finish = [], None
for chunk in stream:
    if chunk.choices:
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
streamed = "".join(pieces)
assert streamed and len([p for p in pieces if p]) > 1 and finish in ("stop", "length"), (pieces, finish)
print(f"streaming:     {streamed!r}")
passed += 1

# A wrong key and an unknown model fail the way the client expects.
try:
    OpenAI(base_url=base_url, api_key="wrong", max_retries=0).chat.completions.create(model=model, messages=question)
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError:
    passed += 1
try:
    client.chat.completions.create(model="gpt-4o", messages=question)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.code == "model_not_found", e
    passed += 1

print(f"openai_e2e: {passed} passed, 0 failed")
