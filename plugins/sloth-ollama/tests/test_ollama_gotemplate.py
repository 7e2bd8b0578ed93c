"""The Go text/template subset that checks translated templates."""

from __future__ import annotations

import pytest
from sloth_ollama.gotemplate import GoTemplateError, render

MESSAGES = {"Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}]}


@pytest.mark.parametrize(
    "template, expected",
    [
        ("x {{- .S -}} y", "xsy"),  # trim markers eat the spaces around
        (
            "{{ range $i, $m := .Messages }}{{ $i }}:{{ .Role }}={{ $m.Content }};{{ end }}",
            "0:user=a;1:assistant=b;",
        ),
        ("{{ range .Empty }}x{{ else }}none{{ end }}", "none"),
        ("{{ $x := 1 }}{{ range .Messages }}{{ $x = .Role }}{{ end }}{{ $x }}", "assistant"),
        ("{{ (index .Messages 1).Content }}{{ len .Messages }}{{ .Messages | len }}", "b22"),
        ('{{ if and .Messages (eq (index .Messages 0).Role "user") }}u{{ end }}', "u"),
        ("{{ if and .Empty (index .Empty 5) }}x{{ else if or .Empty .S }}s{{ end }}", "s"),
        (
            "{{ range $i, $_ := .Messages }}"
            "{{ if eq (len (slice $.Messages $i)) 1 }}last{{ end }}{{ end }}",
            "last",
        ),
        ('{{ "{{" }}{{ `raw\\n` }}{{ print 1 "\\n" true }}{{/* gone */}}', "{{raw\\n1\ntrue"),
        ('{{ if not .S }}a{{ else if ne .S "s" }}b{{ else }}c{{ end }}', "c"),
    ],
)
def test_render(template, expected):
    assert render(template, {**MESSAGES, "S": "s", "Empty": []}) == expected


@pytest.mark.parametrize(
    "template",
    [
        "{{ with .S }}x{{ end }}",
        "{{ .Missing }}",
        "{{ if .S }}x",
        "{{ end }}",
        "{{ json .S }}",
        "{{ $undefined }}",
    ],
)
def test_outside_the_subset_raises(template):
    with pytest.raises(GoTemplateError):
        render(template, {"S": "s"})
