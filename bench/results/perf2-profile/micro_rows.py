import sys
from proxy.ledger import LedgerRow, now_us, period_of
def rows(n):
    out = []
    for i in range(n):
        now = now_us()
        r = LedgerRow(f"req_{now:013x}{i:012x}", "acme", "k", "meta-llama/Llama-3.3-70B-Instruct-Turbo", "chat",
                      "serverless", None, None, False, now, period_of(now), reserved_pusd=123456789)
        t = r.terminal("ok", upstream_status=200, prompt_tokens=200, completion_tokens=64, cached_tokens=0,
                       usage_source="upstream", cost_pusd=987654, stream_complete=True, upstream_id="abc")
        out.append((r, t))
    return out

