"""URL normalisation and "under a root", shared by the server and the pilot (wms.locations)."""

from __future__ import annotations

import pytest

from wms.locations import (
    LocationError,
    ancestors,
    canonical_roots,
    canonical_url,
    is_under,
    name_problem,
    under_any,
)


@pytest.mark.parametrize(
    ("url", "canonical"),
    [
        ("file:///data/in", "file:///data/in"),
        ("file:///data/in/", "file:///data/in"),
        ("FILE://LOCALHOST/data//in/./x/../y", "file:///data/in/y"),
        ("file:///data/%69n", "file:///data/in"),
        ("/data/in", "file:///data/in"),
        ("root://EOS.example.org//eos/x/", "root://eos.example.org/eos/x"),
        ("file:///a b/é", "file:///a%20b/%C3%A9"),
        ("file:///a%20b", "file:///a%20b"),
        ("file:///", "file:///"),
    ],
)
def test_canonical_forms(url, canonical):
    assert canonical_url(url) == canonical


@pytest.mark.parametrize(
    "url",
    [
        "",
        "relative/path",
        "file:/etc/shadow",
        "file:///..",
        "file:///a/../../b",
        "file:///a/%2e%2e/%2e%2e/b",
        "file:///a%2Fb",
        "file:///a%5Cb",
        "file:///a%00b",
        "file:///a\\b",
        "file:///a\nb",
        "file:///a?x=1",
        "file:///a#frag",
        "http://user@host/x",
        "root:///no-host",
        "file:///%ff",
        "x" * 5000,
    ],
)
def test_what_cannot_be_normalised_is_refused(url):
    with pytest.raises(LocationError):
        canonical_url(url)


@pytest.mark.parametrize(
    ("url", "root", "inside"),
    [
        ("file:///data/in/a.root", "file:///data/in/", True),
        ("file:///data/in", "file:///data/in", True),
        ("file:///data/input2/a.root", "file:///data/in", False),
        ("file:///data/in/../input2/a", "file:///data/in", False),
        ("file:///data/in/%2e%2e/x", "file:///data/in", False),
        ("file://localhost/data/in/a", "file:///data/in", True),
        ("file://other/data/in/a", "file:///data/in", False),
        ("root://eos//data/in/a", "file:///data/in", False),
        ("file:///anything", "file:///", True),
    ],
)
def test_under_a_root(url, root, inside):
    (canonical_root,) = canonical_roots([root])
    assert (under_any(url, [canonical_root]) is not None) is inside
    assert is_under(canonical_url(url), canonical_root) is inside


def test_ancestors_top_first():
    assert ancestors("file:///a/b") == ["file:///", "file:///a", "file:///a/b"]
    assert ancestors("root://h/x") == ["root://h/", "root://h/x"]


@pytest.mark.parametrize("name", ["hist.json", "plots/pt.png", "a..b", "...x", "run-1_2.root"])
def test_plain_relative_names(name):
    assert name_problem(name) is None


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../../../etc/cron.d/evil",
        "a/../b",
        "./a",
        "a/.",
        "/etc/shadow",
        "a//b",
        "a/",
        "file:x",
        "file:///etc/shadow",
        "C:x",
        "a\\b",
        "a\x00b",
        "a\tb",
    ],
)
def test_names_that_are_not_plain(name):
    assert name_problem(name) is not None


@pytest.mark.parametrize(
    "url",
    [
        "file:///a/b",
        "file:///a/b/",
        "file:////a",
        "file:///a//b",
        "file:///a/./b",
        "file:///a/b/.",
        "file:///a/b/..",
        "file:///a/../b",
        "file:///a/%2e%2e/b",
        "file:///",
        "file:///A-z_0.9~!$&'()*+,;=:@",
    ],
)
def test_the_fast_path_agrees_with_the_full_parse(url):
    """Plain file:// URLs skip the parse; the answer is what the parse would give."""
    from urllib.parse import quote, unquote

    segments = []
    for seg in url[len("file://") :].split("/"):
        seg = unquote(seg)
        if seg in ("", "."):
            continue
        if seg == "..":
            segments.pop()
            continue
        segments.append(quote(seg, safe="-._~!$&'()*+,;=:@"))
    assert canonical_url(url) == "file:///" + "/".join(segments)
