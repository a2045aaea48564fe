"""cwdpo/report/render.py: the one renderer of every table kind (Markdown, LaTeX, CSV from a Document)."""
import csv
import io
import re

from cwdpo.report import KINDS, Document, Table, render, write_document


def test_a_document_renders_to_markdown_latex_and_csv():
    doc = Document(["### Title", "A note.", Table(["name", "value"], [["a | b", "1.0 [0.5, 1.5]"]],
                                                  tex_rows=[["a | b", "1.0"]]), "- reason"],
                   ["name", "value", "lo", "hi"], [["a | b", 1.0, 0.5, 1.5]],
                   tex_before=["% before"], tex_after=["% after"])
    out = render(doc)
    assert out["md"] == ("### Title\n\nA note.\n\n| name   | value          |\n|--------|----------------|\n"
                         "| a \\| b | 1.0 [0.5, 1.5] |\n\n- reason\n")
    lines = out["tex"].splitlines()
    assert lines[0] == "% before" and lines[-1] == "% after" and out["tex"].endswith("\n")
    assert "\\toprule" in out["tex"] and re.search(r"a \| b\s+& 1\.0\s", out["tex"]) and "[0.5" not in out["tex"]
    assert list(csv.reader(io.StringIO(out["csv"]))) == [["name", "value", "lo", "hi"], ["a | b", "1.0", "0.5", "1.5"]]


def test_latex_headers_can_differ_and_every_table_of_a_document_is_in_its_latex():
    doc = Document([Table(["x", "long header"], [["1", "2"]], tex_headers=["x", "h"]), "text",
                    Table(["y"], [["3"]])], ["x"], [])
    tex = render(doc)["tex"]
    assert tex.count("\\toprule") == 2 and " h " in tex and "long header" not in tex
    assert render(doc)["csv"] == "x\n"


def test_write_document_writes_the_three_files(tmp_path):
    doc = Document(["### T", Table(["a"], [["1"]])], ["a"], [["1"]])
    write_document(doc, str(tmp_path / "t"))
    assert {p.name for p in tmp_path.iterdir()} == {"t.md", "t.csv", "t.tex"}
    assert (tmp_path / "t.md").read_text() == render(doc)["md"]


def test_every_table_kind_supplies_spec_inputs_and_document():
    for kind, module in KINDS.items():
        assert all(callable(getattr(module, f, None)) for f in ("spec", "inputs", "document")), kind
        assert not hasattr(module, "write"), kind  # writing is the renderer's
