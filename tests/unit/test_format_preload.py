"""`bitsmith.formats.preload`: a packer imports what writing needs before it serves, and a host without one
format's optional dependency still gets every other format (and transformers' model code) imported."""

from __future__ import annotations

import sys

import pytest
from bitsmith import formats
from bitsmith.schemes import Format


def test_a_format_that_cannot_be_imported_is_reported_and_the_rest_still_load(monkeypatch: pytest.MonkeyPatch
                                                                               ) -> None:
    monkeypatch.setattr(formats, "_MEMBERS", {**formats._MEMBERS, Format.GGUF: "bitsmith.formats.no_such_module"})
    missing = formats.preload()
    assert list(missing) == [Format.GGUF] and "no_such_module" in missing[Format.GGUF]
    assert "bitsmith.formats.gptq" in sys.modules and "transformers.modeling_utils" in sys.modules
    with pytest.raises(ImportError, match="no_such_module"):  # the job that asks for it fails as before
        formats.get_format(Format.GGUF)


def test_every_format_imports_here() -> None:
    assert formats.preload() == {}
