"""Template parsing at decoration time, and every TemplateError case."""

from __future__ import annotations

import pytest

import parrot_actors as pa
from parrot_actors.variables.template import Slot, Text


def test_parse_directions_params_and_cleandoc():
    @pa.semantic_function(max_tokens=7)
    def f(style, topic: pa.Input, a: pa.Output, b: pa.Output(max_tokens=3, stop=["\n"])):
        """Write in {{style}} style about {{topic}}.
            Title: {{output:a}}
        Body: {{b}} trailing text is dropped"""

    t = f.template
    assert t.inputs == ("topic",) and t.outputs == ("a", "b") and t.params == ("style",)
    assert t.pieces == (
        Text("Write in "),
        Slot("style", "param"),
        Text(" style about "),
        Slot("topic", "input"),
        Text(".\n    Title: "),
        Slot("a", "output"),
        Text("\nBody: "),
        Slot("b", "output"),
    )
    assert f.output_sampling == {"b": {"max_tokens": 3, "stop": ["\n"]}}
    assert f.defaults == {"max_tokens": 7}


def test_bind_renders_params_and_makes_outputs():
    @pa.semantic_function()
    def g(n, x: pa.Input, y: pa.Output):
        """Count {{n}}: {{x}} -> {{y}}"""

    call, (y,) = g.bind(3, "text")
    assert [p.kind for p in call.pieces] == ["text", "input", "text", "output"]
    assert call.pieces[0].text == "Count 3: "
    assert call.pieces[1].var.value() == "text"
    assert y.name == "g.y" and call.outputs == [y]


def make(doc: str, annotations: str = "a: pa.Input, b: pa.Output"):
    src = f"def fn({annotations}):\n    {doc!r}\n"
    scope = {"pa": pa}
    exec(src, scope)
    return pa.semantic_function()(scope["fn"])


@pytest.mark.parametrize(
    "doc,annotations,match",
    [
        ("{{a}} {{c}} {{b}}", "a: pa.Input, b: pa.Output", "placeholder '{{c}}' has no parameter"),
        ("{{b}}", "a: pa.Input, b: pa.Output", r"parameter\(s\) \['a'\] never used"),
        (
            "x {{a}} {{output:b}}{{output:c}}",
            "a: pa.Input, b: pa.Output, c: pa.Output",
            "outputs 'b' and 'c' have no text between them",
        ),
        ("x {{a}} {{b}} then {{b}}", "a: pa.Input, b: pa.Output", "output 'b' is used twice"),
        ("x {{inout:a}} {{b}}", "a: pa.Input, b: pa.Output", "unknown direction 'inout'"),
        (
            "x {{output:a}} {{b}}",
            "a: pa.Input, b: pa.Output",
            "says 'output' but the annotation of 'a' says 'input'",
        ),
        ("x {{a}}", "a: pa.Input", "no output placeholder"),
        ("{{b}} {{a}}", "a: pa.Input, b: pa.Output", "output 'b' has no prompt before it"),
        ("", "a: pa.Input, b: pa.Output", "no docstring"),
    ],
)
def test_template_errors_name_function_and_placeholder(doc, annotations, match):
    with pytest.raises(pa.TemplateError, match=match) as info:
        make(doc, annotations)
    assert "fn" in str(info.value)


def test_unknown_sampling_keyword():
    with pytest.raises(pa.TemplateError, match="temprature"):
        pa.semantic_function(temprature=1.0)
    with pytest.raises(pa.TemplateError, match="max_token"):
        pa.Output(max_token=3)


def test_call_without_runtime_raises():
    fn = make("say {{a}} {{b}}")
    with pytest.raises(pa.TemplateError, match="no runtime is active"):
        fn("x")


def test_bad_arguments():
    fn = make("say {{a}} {{b}}")
    with pytest.raises(pa.TemplateError, match="missing argument"):
        fn.bind()
    with pytest.raises(pa.TemplateError, match="takes a pa.Variable"):
        fn.bind("x", b="not a variable")
