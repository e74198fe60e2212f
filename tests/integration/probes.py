"""Python snippets run inside probe containers on a tenant's network (they print JSON)."""

CHAT = r"""
import json, httpx
base = "http://{host}:{port}"
out = {{}}
out["models"] = [m["id"] for m in httpx.get(base + "/v1/models", timeout=30).json()["data"]]
body = {{"model": "{model}", "messages": [{{"role": "user", "content": "hi"}}], "max_tokens": 8}}
r = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
out["chat_status"] = r.status_code
out["chat"] = r.json()
chunks = []
with httpx.stream("POST", base + "/v1/chat/completions", timeout=60,
                  json={{**body, "stream": True, "stream_options": {{"include_usage": True}}}}) as s:
    for line in s.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunks.append(json.loads(line[6:]))
out["stream_chunks"] = len(chunks)
out["stream_usage"] = chunks[-1].get("usage") if chunks else None
print(json.dumps(out))
"""

CONNECT = r"""
import json, socket
results = {{}}
for target in {targets!r}:
    host, port = target.rsplit(":", 1)
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((host, int(port)))
        results[target] = "connected"
    except OSError as exc:
        results[target] = type(exc).__name__ + ": " + str(exc)
    finally:
        s.close()
print(json.dumps(results))
"""
