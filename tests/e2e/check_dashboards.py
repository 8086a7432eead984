"""Every PromQL expression in the dashboards evaluates on a real Prometheus scraping
voltcast, without error and with data; every metric named is one voltcast exports."""
import json
import pathlib
import re
import sys
import urllib.parse
import urllib.request

prom, api, folder = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def exprs(node):
    if isinstance(node, dict):
        if isinstance(node.get("expr"), str):
            yield node["expr"]
        for v in node.values():
            yield from exprs(v)
    elif isinstance(node, list):
        for v in node:
            yield from exprs(v)


exported = set(re.findall(r"^(voltcast_[a-z0-9_]+)", get(f"{api}/metrics"), re.M))
failures, checked = [], 0
for path in sorted(folder.glob("*.json")):
    dashboard = json.loads(path.read_text())
    for expr in exprs(dashboard):
        checked += 1
        for name in set(re.findall(r"\bvoltcast_[a-z0-9_]+", expr)):
            if name not in exported:
                failures.append(f"{path.name}: {name} is not exported by voltcast ({expr})")
        q = urllib.parse.urlencode({"query": expr})
        try:
            body = json.loads(get(f"{prom}/api/v1/query?{q}"))
        except Exception as e:  # an HTTP 400 is a PromQL error
            failures.append(f"{path.name}: {expr}: {e}")
            continue
        if body.get("status") != "success":
            failures.append(f"{path.name}: {expr}: {body.get('error')}")
        elif not body["data"]["result"]:
            failures.append(f"{path.name}: {expr}: no data")

print(f"dashboards: {checked} expressions checked, {len(exported)} voltcast metrics exported")
for f in failures:
    print("FAIL", f)
sys.exit(1 if failures else 0)
