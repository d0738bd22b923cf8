import pytest

from pipeline.errors import RefError
from pipeline.refs import parse_ref, validate_alias


@pytest.mark.parametrize(
    "text, name, tag, entity, project",
    [
        ("ds", "ds", "latest", None, None),
        ("ds:v0", "ds", "v0", None, None),
        ("ds:v12", "ds", "v12", None, None),
        ("ds:production", "ds", "production", None, None),
        ("proj/ds:v1", "ds", "v1", None, "proj"),
        ("team/proj/ds:candidate", "ds", "candidate", "team", "proj"),
        ("my.data_set-2:best-1", "my.data_set-2", "best-1", None, None),
    ],
)
def test_parse(text, name, tag, entity, project):
    r = parse_ref(text)
    assert (r.name, r.tag, r.entity, r.project) == (name, tag, entity, project)


def test_version_vs_alias():
    assert parse_ref("ds:v3").version == 3 and not parse_ref("ds:v3").is_alias
    assert parse_ref("ds:prod").version is None and parse_ref("ds:prod").is_alias
    assert str(parse_ref("ds")) == "ds:latest"


@pytest.mark.parametrize("text", ["", "  ", "ds:", ":v1", "a/b/c/ds", "../ds", "ds:a:b", "d s", "ds:v1!", "-ds"])
def test_unparseable(text):
    with pytest.raises(RefError):
        parse_ref(text)


def test_alias_cannot_look_like_a_version():
    with pytest.raises(RefError, match="versions, not aliases"):
        validate_alias("v2")
