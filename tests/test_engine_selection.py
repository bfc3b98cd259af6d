"""Which KCP engine gkcp.kcp selects: the compiled one or the pure-Python one.

* GKCP_REQUIRE_COMPILED=1 (scripts/test.sh sets it): the compiled engine
  must be built, fresh and in use, also through gkcp.conversation.
* GKCP_PURE_PYTHON=1 selects the pure-Python engine (in a subprocess).
* A compiled engine built from another kcp.py or kcp.pxd is never used, and
  a stale build fails this file: rebuild it.
* Without the extension, gkcp.kcp falls back to pure Python and says why.

The conformance suite itself runs against both engines (conftest.kcp_engine).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import shutil
import subprocess
import sys

import pytest

import gkcp.kcp

PACKAGE_DIR = os.path.dirname(os.path.abspath(gkcp.kcp.__file__))
ROOT = os.path.dirname(PACKAGE_DIR)


def compiled_module():
    """gkcp._kcp_compiled, or skip when it is not built."""
    try:
        return importlib.import_module("gkcp._kcp_compiled")
    except ImportError as exc:
        pytest.skip(f"compiled KCP engine not built: {exc}")


def engine_in_subprocess(**env: str) -> str:
    """gkcp.kcp's IMPLEMENTATION and KCP's module in a fresh interpreter."""
    environ = {k: v for k, v in os.environ.items() if k != "GKCP_PURE_PYTHON"}
    environ.update(env, PYTHONPATH=ROOT)
    code = "import gkcp.kcp as k; print(k.IMPLEMENTATION, k.KCP.__module__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=environ, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.skipif(os.environ.get("GKCP_REQUIRE_COMPILED") != "1",
                    reason="GKCP_REQUIRE_COMPILED=1 not set")
def test_compiled_engine_required_and_in_use():
    import gkcp.conversation

    assert gkcp.kcp.IMPLEMENTATION == "compiled", gkcp.kcp.ENGINE_NOTE
    compiled = compiled_module()
    assert gkcp.kcp.KCP is compiled.KCP
    assert gkcp.conversation.KCP is compiled.KCP
    assert compiled.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    # kcp.pxd's C types are in force: a field holds a C long long
    with pytest.raises(OverflowError):
        compiled.KCP(1, lambda d: None).snd_una = 2**64


def test_compiled_engine_is_fresh():
    compiled = compiled_module()
    assert compiled.SOURCE_DIGEST == gkcp.kcp.source_digest(PACKAGE_DIR), (
        "gkcp/_kcp_compiled was built from another kcp.py or kcp.pxd, so gkcp runs "
        "the pure-Python engine: rebuild it (pip install -e . or "
        "python setup.py build_ext --inplace)"
    )


def test_pure_python_environment_variable():
    assert engine_in_subprocess(GKCP_PURE_PYTHON="1") == "pure gkcp.kcp"


def test_default_selection_in_subprocess(monkeypatch):
    monkeypatch.delenv("GKCP_PURE_PYTHON", raising=False)
    found, _ = gkcp.kcp._compiled_engine()
    expected = "pure gkcp.kcp" if found is None else "compiled gkcp._kcp_compiled"
    assert engine_in_subprocess() == expected
    assert engine_in_subprocess(GKCP_PURE_PYTHON="0") == expected


def test_stale_compiled_engine_is_not_used(monkeypatch):
    compiled = compiled_module()
    monkeypatch.delenv("GKCP_PURE_PYTHON", raising=False)
    monkeypatch.setattr(compiled, "SOURCE_DIGEST", gkcp.kcp.source_digest(PACKAGE_DIR))
    assert gkcp.kcp._compiled_engine() == (compiled.KCP, "")
    monkeypatch.setattr(compiled, "SOURCE_DIGEST", "0" * 64)
    found, note = gkcp.kcp._compiled_engine()
    assert found is None and "stale" in note


def test_missing_compiled_engine_falls_back(monkeypatch):
    monkeypatch.delenv("GKCP_PURE_PYTHON", raising=False)
    monkeypatch.setitem(sys.modules, "gkcp._kcp_compiled", None)  # import fails
    found, note = gkcp.kcp._compiled_engine()
    assert found is None and "not built" in note


def test_source_digest_covers_kcp_py_and_pxd(tmp_path):
    for name in ("kcp.py", "kcp.pxd"):
        shutil.copy(os.path.join(PACKAGE_DIR, name), tmp_path / name)
    digest = gkcp.kcp.source_digest(str(tmp_path))
    assert digest == gkcp.kcp.source_digest(PACKAGE_DIR)
    for name in ("kcp.py", "kcp.pxd"):
        with open(tmp_path / name, "a") as f:
            f.write("\n")
        changed = gkcp.kcp.source_digest(str(tmp_path))
        assert changed != digest, name
        digest = changed


@pytest.mark.skipif(os.environ.get("KCPSIM_SELF_CHECK") == "1", reason="ikcp stands in")
def test_conformance_suite_gets_each_engine(kcp_engine):
    import kcpsim

    if kcp_engine == "pure":
        assert kcpsim.engine_class() is gkcp.kcp.PURE_KCP
        assert os.environ["GKCP_PURE_PYTHON"] == "1"
    else:
        assert kcpsim.engine_class() is compiled_module().KCP
