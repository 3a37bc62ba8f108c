"""The docs: generated reference pages match the code, every intra-repo link resolves, the README is short.

``docs/reference/*.md`` are written by ``scripts/gen_docs.py`` from the pydantic schema, the ``Reason``
enum, the metric constructors, the argparse parser and the decision-record field table; like
``envoy/bootstrap.example.json``, a committed page that differs from what the code produces fails here.
"""

from __future__ import annotations

import difflib
import enum
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
from pydantic import BaseModel

from sidecar.audit import RECORD_FIELDS, decision_record
from sidecar.audit.chain import ChainHead, link
from sidecar.decision import Decision, Direction, Protocol, Reason, TokenInfo
from sidecar.errors import BundleDetail, SvidDetail

REPO = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists())
REGENERATE = ".venv/bin/python scripts/gen_docs.py"


@pytest.fixture(scope="module")
def gen_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", REPO / "scripts" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_docs"] = module
    spec.loader.exec_module(module)
    return module


def test_reference_pages_are_current(gen_docs: ModuleType) -> None:
    pages: dict[str, str] = gen_docs.render_pages()
    assert set(pages) == {"config.md", "authority-config.md", "reasons.md", "metrics.md", "cli.md", "records.md"}
    committed = {p.name for p in (REPO / "docs" / "reference").glob("*.md")}
    assert committed == set(pages), (
        f"docs/reference/ holds pages the generator does not write: {committed - set(pages)}"
    )
    stale = []
    for name, text in pages.items():
        path = REPO / "docs" / "reference" / name
        current = path.read_text(encoding="utf-8")
        if current != text:
            diff = "".join(
                list(
                    difflib.unified_diff(
                        current.splitlines(keepends=True),
                        text.splitlines(keepends=True),
                        f"committed docs/reference/{name}",
                        "generated from the code",
                    )
                )[:40]
            )
            stale.append(f"docs/reference/{name} is stale:\n{diff}")
    assert not stale, "\n".join(stale) + f"\nregenerate with `{REGENERATE}` and commit the result"


def test_check_mode_names_a_stale_page(
    gen_docs: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gen_docs.main(["--out", str(tmp_path)]) == 0
    assert gen_docs.main(["--out", str(tmp_path), "--check"]) == 0
    (tmp_path / "reasons.md").write_text("# edited by hand\n")
    assert gen_docs.main(["--out", str(tmp_path), "--check"]) == 1
    assert "stale: reasons.md" in capsys.readouterr().err


def test_an_undescribed_config_key_is_refused(gen_docs: ModuleType) -> None:
    class Undocumented(BaseModel):
        """A section."""

        key: int = 1

    with pytest.raises(gen_docs.DocGenError, match=r"Undocumented\.key: no description"):
        gen_docs._Schema().walk(Undocumented, "x")


def test_every_reason_has_a_meaning(gen_docs: ModuleType) -> None:
    docs = gen_docs._member_docs(Reason)
    assert set(docs) == {reason.name for reason in Reason}
    page = gen_docs.reasons_page()
    for reason in Reason:
        assert f"| `{reason.value}` |" in page


def test_every_identity_sub_code_has_a_meaning_on_the_reasons_page(gen_docs: ModuleType) -> None:
    page = gen_docs.reasons_page()
    for enum_class in (SvidDetail, BundleDetail):
        assert set(gen_docs._member_docs(enum_class)) == {member.name for member in enum_class}
        for member in enum_class:
            assert f"| `{member.value}` |" in page


def test_an_undescribed_sub_code_is_refused(gen_docs: ModuleType) -> None:
    class Undocumented(enum.StrEnum):
        DESCRIBED = "described"
        """A meaning."""
        BARE = "bare"

    with pytest.raises(gen_docs.DocGenError, match=r"Undocumented\.BARE: no docstring"):
        gen_docs.sub_code_table(Undocumented)


def _record(decision: Decision) -> dict[str, object]:
    record = decision_record(decision, request_id="r", latency_us=1, now=0.0)
    link(record, ChainHead.start())
    return record


def test_record_fields_are_exactly_what_the_builder_writes() -> None:
    """RECORD_FIELDS names every field decision_record and the chain write, in the order written."""
    token = TokenInfo(jti="j", aud="https://a", exp=1, cached=True)
    plain = Decision(allow=False, reason=Reason.PATH_NOT_ALLOWED, http_status=403, decision_id="d", qtype="TXT")
    intercepted = Decision(
        allow=True,
        reason=Reason.ALLOWED,
        http_status=200,
        decision_id="d",
        token=token,
        tls="intercept",
        upstream_verify="dns:a ca:/ca.pem",
        sni="a",
        protocol=Protocol.HTTP,
        connect="a:443",
    )
    dry = Decision(
        allow=True,
        reason=Reason.DRY_RUN,
        http_status=200,
        decision_id="d",
        direction=Direction.INGRESS,
        caller="spiffe://td/a",
        peer="spiffe://td/gateway",
        dry_run=True,
        would_reason=Reason.CALLER_NOT_ALLOWED,
    )
    mcp = Decision(
        allow=True,
        reason=Reason.ALLOWED,
        http_status=200,
        decision_id="d",
        rpc_protocol="mcp",
        rpc={"method": "tools/call", "tool": "query"},
    )
    a2a = Decision(
        allow=False,
        reason=Reason.RPC_METHOD_NOT_ALLOWED,
        http_status=403,
        decision_id="d",
        rpc_protocol="a2a",
        rpc={"method": "GetTask"},
    )
    waiting = Decision(
        allow=False,
        reason=Reason.APPROVAL_REQUIRED,
        http_status=403,
        decision_id="d",
        approval={"id": "a1", "status": "pending", "expires_at": 1.0},
    )
    control = Decision(
        allow=True,
        reason=Reason.TASK_FROZEN,
        http_status=200,
        decision_id="d",
        direction=Direction.CONTROL,
        action={"kind": "freeze", "target": "subtree:t1", "evidence": ["x"]},
    )
    order = [field.name for field in RECORD_FIELDS]
    assert len(order) == len(set(order))
    written: set[str] = set()
    for decision in (plain, intercepted, dry, mcp, a2a, waiting, control):
        keys = list(_record(decision))
        assert keys == [name for name in order if name in keys], "a record's fields follow RECORD_FIELDS order"
        written.update(keys)
    assert written == set(order)
    assert all(field.type and field.meaning for field in RECORD_FIELDS)


# -- the README and the docs tree ---------------------------------------------------------------------

README = REPO / "README.md"
INSTALL_AND_DEMO = "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/agent-authz demo"
TEST_COMMAND = ".venv/bin/python -m pytest"


def test_readme_is_short_and_keeps_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    assert f"\n{INSTALL_AND_DEMO}\n" in text
    assert f"\n{TEST_COMMAND}\n" in text


def _markdown_files() -> list[Path]:
    files = [README, REPO / "envoy" / "README.md", REPO / "charts" / "agent-authz" / "README.md"]
    return files + sorted((REPO / "docs").rglob("*.md"))


_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _prose(text: str) -> str:
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file (lower case, punctuation dropped, duplicates numbered)."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in _HEADING.findall(_FENCE.sub("", path.read_text(encoding="utf-8"))):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_every_intra_repo_markdown_link_resolves() -> None:
    broken = []
    for source in _markdown_files():
        for target in _LINK.findall(_prose(source.read_text(encoding="utf-8"))):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (source.parent / file_part).resolve() if file_part else source
            where = f"{source.relative_to(REPO)}: ({target})"
            if not resolved.exists():
                broken.append(f"{where}: no such file")
            elif REPO not in resolved.parents and resolved != REPO:
                broken.append(f"{where}: outside the repository")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{where}: no heading with anchor #{anchor}")
    assert not broken, "\n".join(broken)


def test_the_docs_map_names_every_page() -> None:
    """docs/README.md (the map) and the README link every page of docs/."""
    listed = {
        (REPO / "docs" / target.partition("#")[0]).resolve()
        for target in _LINK.findall(_prose((REPO / "docs" / "README.md").read_text(encoding="utf-8")))
    }
    pages = {p.resolve() for p in (REPO / "docs").rglob("*.md")} - {(REPO / "docs" / "README.md").resolve()}
    assert pages <= listed, f"pages missing from docs/README.md: {sorted(str(p) for p in pages - listed)}"
    assert "docs/README.md" in README.read_text(encoding="utf-8")
