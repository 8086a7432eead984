"""docker-compose.yml validates (Debian's docker-compose), every build context it names
exists with a Dockerfile, and every voltcast command in it parses: `voltcast <command>
--help`, and `voltcast config check` with that service's environment.

Usage: check_compose.py VOLTCAST_BINARY (from the repository root)."""
import os
import pathlib
import subprocess
import sys

import yaml

binary = sys.argv[1]
root = pathlib.Path.cwd()
def resolve(secret):
    """The compose file as docker-compose resolves it, with or without a secret set."""
    env = {k: v for k, v in os.environ.items() if k != "VOLTCAST_WEBHOOK_SECRET"}
    if secret:
        env["VOLTCAST_WEBHOOK_SECRET"] = secret
    out = subprocess.run(
        ["docker-compose", "-f", "docker-compose.yml", "config"],
        check=True, capture_output=True, text=True, env=env,
    ).stdout
    return yaml.safe_load(out)


def service_env(service):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOLTCAST_")}
    env.update({k: str(v) for k, v in (service.get("environment") or {}).items()})
    return env


failures = []
checked = 0
# Without VOLTCAST_WEBHOOK_SECRET the stack falls back to a public placeholder, which
# `voltcast run` must refuse, naming the key and the variable to set.
voltcast = resolve(None)["services"]["voltcast"]
r = subprocess.run([binary, "config", "check"], env=service_env(voltcast),
                   capture_output=True, text=True, cwd="/tmp")
checked += 1
if r.returncode == 0 or "VOLTCAST_WEBHOOK_SECRET" not in r.stderr:
    failures.append(f"voltcast: the placeholder secret was accepted: {r.stderr.strip()[:300]}")
# As the README starts it: with a secret of the operator's own.
compose = resolve("compose-check-secret")
for name, service in compose["services"].items():
    build = service.get("build")
    if build is None:
        continue
    context = pathlib.Path(build["context"] if isinstance(build, dict) else build)
    context = context if context.is_absolute() else root / context
    dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
    if not context.is_dir() or not dockerfile.is_file():
        failures.append(f"{name}: build context {context} or {dockerfile} missing")
        continue
    command = service.get("command") or []
    if isinstance(command, str):
        command = command.split()
    env = service_env(service)
    runs = [command + ["--help"], ["config", "check"]]
    for args in runs:
        checked += 1
        r = subprocess.run([binary, *args], env=env, capture_output=True, text=True, cwd="/tmp")
        if r.returncode != 0:
            failures.append(f"{name}: voltcast {' '.join(args)} failed: {(r.stderr or r.stdout).strip()[:300]}")
print(f"compose: validated; {checked} voltcast invocations checked")
for f in failures:
    print("FAIL", f)
sys.exit(1 if failures else 0)
