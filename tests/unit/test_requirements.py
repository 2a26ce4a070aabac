"""requirements.txt at deploy: specifiers pass, sources are refused unless allowed."""

from __future__ import annotations

import pytest

from warmstart.errors import InvalidParameter
from warmstart.packages.requirements import parse_requirements


def test_specifiers_pass_rewritten_from_what_was_parsed() -> None:
    text = (
        "# a comment\n"
        "Requests[socks] >= 2.30 ; python_version > '3.8'  # trailing comment\n"
        "\n"
        "six==1.17.0 \\\n"
        "    --hash=sha256:0123abcd --hash sha256:4567ef\n"
        "zope.interface\n"
    )
    reqs = parse_requirements(text)
    assert reqs.names == ("requests", "six", "zope-interface")
    assert reqs.text.splitlines() == [
        'Requests[socks]>=2.30; python_version > "3.8"',
        "six==1.17.0 --hash=sha256:0123abcd --hash=sha256:4567ef",
        "zope.interface",
    ]


def test_empty_and_comment_only_files_ask_for_nothing() -> None:
    assert parse_requirements("").text == ""
    assert parse_requirements("# nothing\n\n   \n").names == ()


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("--index-url http://127.0.0.1:18556/", "names a package index"),
        ("-i http://127.0.0.1:18556/", "names a package index"),
        ("-ihttp://127.0.0.1:18556/", "names a package index"),
        ("--index-url=http://127.0.0.1:18556/", "names a package index"),
        ("--extra-index-url http://10.0.0.1/simple", "names a package index"),
        ("--no-index", "names a package index"),
        ("-f http://127.0.0.1:8000/links", "names a page or directory of links"),
        ("--find-links /srv/wheels", "names a page or directory of links"),
        ("--trusted-host 127.0.0.1", "names a host to trust"),
        ("-r other.txt", "includes another file"),
        ("-c constraints.txt", "includes another file"),
        ("-e git+http://127.0.0.1/x.git#egg=x", "is an editable install"),
        ("--editable ./local", "is an editable install"),
        ("pkg @ http://127.0.0.1:18556/pkg-1.0-py3-none-any.whl", "is a direct URL or path"),
        ("pkg@file:///etc/passwd", "is a direct URL or path"),
        ("http://127.0.0.1:18556/pkg-1.0-py3-none-any.whl", "is a direct URL or path"),
        ("./vendor/pkg", "is a direct URL or path"),
        ("/abs/pkg.tar.gz", "is a direct URL or path"),
        ("pkg-1.0-py3-none-any.whl", "is a direct URL or path"),
        ("pkg.tar.gz", "is a direct URL or path"),
        ("six --global-option=--x", "is an option this node does not accept"),
        ("six --config-settings k=v", "is an option this node does not accept"),
        ("six --index-url http://127.0.0.1:1/", "names a package index"),
        ("six --hash=not-a-hash", "is an option this node does not accept"),
        ("--pre", "is an option this node does not accept"),
    ],
)
def test_sources_are_refused_naming_the_line(line: str, says: str) -> None:
    with pytest.raises(InvalidParameter) as err:
        parse_requirements(f"six\n# fine so far\n{line}\nrequests\n")
    message = str(err.value)
    assert message.startswith("requirements.txt line 3 (")
    assert says in message
    assert "--allow-requirement-sources" in message


def test_a_continued_option_is_refused_at_its_first_line() -> None:
    with pytest.raises(InvalidParameter, match=r"line 2 .*names a package index"):
        parse_requirements("six\n--index-url \\\nhttp://127.0.0.1:1/\n")


def test_a_line_that_is_no_specifier_is_refused() -> None:
    with pytest.raises(InvalidParameter, match=r"line 1 .*not a requirement specifier"):
        parse_requirements("six==\n")


def test_long_lines_are_quoted_short() -> None:
    with pytest.raises(InvalidParameter) as err:
        parse_requirements("--index-url http://127.0.0.1/" + "x" * 500 + "\n")
    assert len(str(err.value)) < 300


def test_the_operator_may_allow_sources() -> None:
    text = "--index-url http://mirror.internal/simple\npkg @ http://host/pkg.whl\nsix\n"
    reqs = parse_requirements(text, allow_sources=True)
    assert reqs.text == text
    assert reqs.names == ("pkg", "six")


def test_installer_failures_name_only_the_callers_own_requirements() -> None:
    from warmstart.packages.cache import _first_named

    output = "Failed to fetch: http://10.0.0.5/listed_elsewhere-1.0-py3-none-any.whl (foo-bar)"
    assert _first_named(["foo", "listed-elsewhere"], output) == "listed-elsewhere"
    assert _first_named(["zope-interface"], "zope.interface==5 conflicts") == "zope-interface"
    assert _first_named(["foo"], output) is None  # foo-bar is another project
