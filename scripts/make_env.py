"""Writes a new .env from .env.example with fresh random secrets: `make .env`.

    python3 scripts/make_env.py .env.example .env

.env.example publishes example values for the secrets below; a stack started with them lets
anyone who read the file mint tokens and forge page tokens (`epochlens up` refuses them).
This copies the example line for line and replaces each secret's value with 48 random bytes
(URL-safe base64). An existing target is never overwritten. Standard library only: it runs
before the project's virtual environment exists.
"""

import os
import re
import secrets
import sys
from pathlib import Path

# Keep in step with services.common.config.EXAMPLE_SECRETS (tests/unit/test_startup_checks.py).
SECRET_SETTINGS = ("EPOCHLENS_AUTH_JWT_SECRET", "EPOCHLENS_QUERY_PAGE_TOKEN_SECRET")
SECRET_BYTES = 48


def with_fresh_secrets(example: str) -> str:
    """`example` with each SECRET_SETTINGS line's value replaced by a new random secret."""
    text = example
    for name in SECRET_SETTINGS:
        pattern = re.compile(rf"^{name}=.*$", flags=re.MULTILINE)
        if len(pattern.findall(text)) != 1:
            raise ValueError(f"{name}= must appear exactly once in the example")
        value = secrets.token_urlsafe(SECRET_BYTES)
        text = pattern.sub(lambda _match, n=name, v=value: f"{n}={v}", text)
    return text


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: make_env.py EXAMPLE TARGET", file=sys.stderr)
        return 2
    example, target = Path(argv[0]), Path(argv[1])
    try:
        text = with_fresh_secrets(example.read_text())
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except (OSError, ValueError) as exc:
        print(f"make_env: {exc}", file=sys.stderr)
        return 1
    with os.fdopen(descriptor, "w") as out:
        out.write(text)
    print(f"wrote {target} with fresh secrets ({', '.join(SECRET_SETTINGS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
