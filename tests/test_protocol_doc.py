"""docs/protocol.md prints what the code does: the Lua scripts and the worked example's bytes."""

from __future__ import annotations

import re
from pathlib import Path

from nearcache._core.codec import Invalidation, Kind, encode
from nearcache._core.log import EPOCH_SCRIPT, PUBLISH_SCRIPT

DOC = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()


def _lua_blocks() -> list[str]:
    return re.findall(r"```lua\n(.*?)\n```", DOC, flags=re.S)


def test_the_scripts_printed_are_the_scripts_run() -> None:
    """A publisher written from the page runs exactly the publish script nearcache runs, and
    the epoch script printed is the one subscribers run."""
    assert _lua_blocks() == [PUBLISH_SCRIPT.strip("\n"), EPOCH_SCRIPT.strip("\n")]


def test_the_worked_example_is_what_encode_writes() -> None:
    """The example message's hex on the page is encode()'s output, unsigned and signed."""
    sender = bytes.fromhex("0123456789abcdef0123456789abcdef")
    first = encode(
        sender,
        1,
        [
            Invalidation(Kind.KEY, "products", "42"),
            Invalidation(Kind.KEY, None, 7),
            Invalidation(Kind.REGION, "prices"),
        ],
    )
    second = encode(sender, 2, [Invalidation(Kind.CLEAR)], signing_key=("k1", b"s3cret"))
    assert first.hex() in DOC
    assert second.hex() in DOC
