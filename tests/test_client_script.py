"""The browser client stays small: at most 5 KB gzipped, as a page downloads it from the gateway
(``server.client_script``: the source without its whole-line comments)."""

from __future__ import annotations

import gzip
from pathlib import Path

from gateway.server import client_script

STATIC = Path(__file__).resolve().parent.parent / "gateway" / "static"
LIMIT = 5 * 1024  # bytes, gzip level 9


def gzipped_size(name: str) -> int:
    return len(gzip.compress(client_script(name), compresslevel=9))


def test_classic_script_is_at_most_5_kb_gzipped() -> None:
    size = gzipped_size("gateway.js")
    assert size <= LIMIT, f"gateway.js is {size} bytes gzipped, over the {LIMIT}-byte budget"


def test_module_build_is_at_most_5_kb_gzipped() -> None:
    # An ES module user downloads gateway.mjs and the gateway.js it imports.
    size = gzipped_size("gateway.mjs") + gzipped_size("gateway.js")
    assert size <= LIMIT, f"gateway.mjs + gateway.js are {size} bytes gzipped, over the {LIMIT}-byte budget"


def test_module_imports_the_classic_script() -> None:
    # One implementation: the module must re-export gateway.js, not carry a copy that drifts.
    source = (STATIC / "gateway.mjs").read_text()
    assert 'import "./gateway.js";' in source
