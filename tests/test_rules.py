"""rules/: the shipped policy files load; every kind of mistake is reported with its file and
line; messages are classified, routed and scanned as an operator would expect."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.cli.rules import SHIPPED_RULES
from broker.cli.rules import rules as rules_cli
from broker.policy.classify import classify, route, scan_patterns
from broker.policy.rules import RulesError, check_rules, load_rules

SHIPPED = load_rules(SHIPPED_RULES)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A copy of the shipped rules to break."""
    dest = tmp_path / "rules"
    shutil.copytree(SHIPPED_RULES, dest)
    return dest


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, old
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def line_of(path: Path, needle: str) -> int:
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if needle in line:
            return n
    raise AssertionError(needle)


def only_error(folder: Path) -> str:
    errors = check_rules(folder)
    assert len(errors) == 1, errors
    return errors[0]


# -- the shipped files ------------------------------------------------------------------------


def test_shipped_rules_load_cleanly() -> None:
    assert check_rules(SHIPPED_RULES) == []
    assert SHIPPED.default_jurisdiction == "us-federal"
    assert {"mental_health", "psychotherapy_notes", "substance_use", "hiv", "genetic",
            "sexual_reproductive_health", "abuse_violence", "ot_progress", "speech_progress",
            "evaluation", "medication", "attendance", "strategies"} <= set(SHIPPED.categories)
    assert SHIPPED.categories["mental_health"].sensitive
    assert SHIPPED.categories["mental_health"].ds4p_code == "PSY"
    assert not SHIPPED.categories["ot_progress"].sensitive
    assert SHIPPED.routing["ot_progress"] == ("ot", "case-manager")
    assert SHIPPED.hold.lifetime_days > max(SHIPPED.hold.reminder_days)
    assert [p.name for p in SHIPPED.always_redact] == ["us_ssn"]
    assert {p.name for p in SHIPPED.suggest} == {"phone", "date_of_birth", "street_address"}


def test_shipped_jurisdictions() -> None:
    js = SHIPPED.jurisdictions
    assert set(js) == {"us-federal", "us-il", "us-ca", "us-wa", "us-pa"}
    for j in js.values():
        assert (j.majority_age, j.majority_notice_age) == (18, 17)
        assert j.rule("psychotherapy_notes").standing_consent is False
        assert j.rule("substance_use").release_notice == (
            "42 CFR part 2 prohibits unauthorized use or disclosure of these records.")
        assert j.rule("ot_progress").standing_consent is True
    assert js["us-federal"].rule("mental_health").co_consent_age is None
    assert {k: js[k].rule("mental_health").co_consent_age
            for k in ("us-il", "us-ca", "us-wa", "us-pa")} == {
        "us-il": 12, "us-ca": 12, "us-wa": 13, "us-pa": 14}
    assert js["us-il"].rule("mental_health").minor_veto
    assert js["us-il"].consent_requires_expiry
    assert not js["us-ca"].consent_requires_expiry
    assert js["us-wa"].extends == ("us-federal",)


def test_cli_check_ok_and_errors(folder: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(rules_cli, ["check", "--rules", str(folder)])
    assert ok.exit_code == 0, ok.output
    assert "ok (13 categories" in ok.output
    edit(folder / "default.toml", "lifetime_days = 30", "lifetime_days = 30\nlifetime = 3")
    bad = runner.invoke(rules_cli, ["check", "--rules", str(folder)])
    assert bad.exit_code == 1
    line = line_of(folder / "default.toml", "lifetime = 3")
    assert f"{folder / 'default.toml'}:{line}: unknown key 'lifetime'" in bad.output


def test_cli_prefers_home_rules(folder: Path, tmp_path: Path) -> None:
    home = tmp_path  # the fixture put rules/ in it
    edit(folder / "default.toml", 'jurisdiction = "us-federal"', 'jurisdiction = "us-xx"')
    result = CliRunner().invoke(rules_cli, ["check", "--home", str(home)])
    assert result.exit_code == 1
    assert "us-xx" in result.output


# -- mistakes, each with file and line --------------------------------------------------------


def test_toml_syntax_error(folder: Path) -> None:
    edit(folder / "default.toml", "lifetime_days = 30", "lifetime_days = = 30")
    error = only_error(folder)
    line = line_of(folder / "default.toml", "lifetime_days = = 30")
    assert error.startswith(f"{folder / 'default.toml'}:{line}: TOML syntax")


def test_unknown_key_in_category(folder: Path) -> None:
    edit(folder / "default.toml", "[categories.hiv]\n", "[categories.hiv]\nwordz = []\n")
    line = line_of(folder / "default.toml", "wordz")
    assert only_error(folder) == (
        f"{folder / 'default.toml'}:{line}: unknown key 'wordz' in [categories.hiv] "
        "(allowed: description, sensitivity, sensitive, sender_tags, words, attachment_names)")


def test_bad_regex_in_second_pattern(folder: Path) -> None:
    path = folder / "default.toml"
    text = path.read_text(encoding="utf-8")
    start = text.index('name = "date_of_birth"')
    regex_at = text.index("regex = ", start)
    end = text.index("\n", regex_at)
    path.write_text(text[:regex_at] + "regex = '''(unclosed'''" + text[end:], encoding="utf-8")
    error = only_error(folder)
    assert error.startswith(f"{path}:{line_of(path, '(unclosed')}: regex of pattern "
                            "'date_of_birth' does not compile")


def test_regex_matching_empty_text(folder: Path) -> None:
    path = folder / "default.toml"
    lines = path.read_text(encoding="utf-8").split("\n")
    n = next(i for i, t in enumerate(lines) if t.startswith("regex = ") and "(?!000" in t)
    lines[n] = 'regex = "x*"'
    path.write_text("\n".join(lines), encoding="utf-8")
    assert only_error(folder) == (f"{path}:{n + 1}: regex of pattern 'us_ssn' matches "
                                  "empty text")


def test_routing_names_an_undefined_category(folder: Path) -> None:
    edit(folder / "default.toml", 'ot_progress = ["ot", "case-manager"]',
         'ot_progress = ["ot", "case-manager"]\nart_therapy = ["art"]')
    line = line_of(folder / "default.toml", "art_therapy = ")
    assert only_error(folder) == (f"{folder / 'default.toml'}:{line}: routing names category "
                                  "'art_therapy', which is not defined in [categories]")


def test_wrong_types_and_values(folder: Path) -> None:
    path = folder / "default.toml"
    edit(path, "reminder_days = [3, 7, 21]", "reminder_days = [7, 3, 40]")
    edit(path, 'sensitivity = "hiv"', 'sensitivity = "viral"')
    edit(path, 'sender_tags = ["slp", "speech"]', 'sender_tags = ["Speech Therapist"]')
    errors = check_rules(folder)
    assert errors == [
        f"{path}:{line_of(path, 'reminder_days')}: hold.reminder_days must each be from 1 to "
        "29 (before the hold expires after lifetime_days = 30)",
        f"{path}:{line_of(path, 'viral')}: sensitivity 'viral' is not one of mental_health, "
        "psychotherapy_notes, substance_use, hiv, genetic, sexual_reproductive_health, "
        "abuse_violence, normal",
        f"{path}:{line_of(path, 'Speech Therapist')}: categories.speech_progress.sender_tags: "
        "'Speech Therapist' is not a valid tag",
    ]


def test_ds4p_category_must_be_sensitive(folder: Path) -> None:
    path = folder / "default.toml"
    text = path.read_text(encoding="utf-8")
    at = text.index("[categories.genetic]")
    cut = text.index("sensitive = true", at)
    path.write_text(text[:cut] + "sensitive = false" + text[cut + len("sensitive = true"):],
                    encoding="utf-8")
    line = line_of(path, "sensitive = false")  # the first one is genetic's
    assert only_error(folder) == (f"{path}:{line}: category genetic has sensitivity "
                                  "'genetic', so it must be sensitive = true")


def test_duplicate_pattern_name(folder: Path) -> None:
    edit(folder / "default.toml", 'name = "street_address"', 'name = "phone"')
    path = folder / "default.toml"
    lines = path.read_text(encoding="utf-8").split("\n")
    second = [n for n, t in enumerate(lines, start=1) if t == 'name = "phone"'][1]
    assert only_error(folder) == f"{path}:{second}: pattern name 'phone' is used twice"


def test_missing_required_key_points_at_table(folder: Path) -> None:
    path = folder / "default.toml"
    text = path.read_text(encoding="utf-8")
    at = text.index("[categories.attendance]")
    cut = text.index('sensitivity = "normal"\n', at)
    path.write_text(text[:cut] + text[cut + len('sensitivity = "normal"\n'):], encoding="utf-8")
    assert only_error(folder) == (f"{path}:{line_of(path, '[categories.attendance]')}: "
                                  "categories.attendance needs 'sensitivity'")


def test_missing_default_file(folder: Path) -> None:
    (folder / "default.toml").unlink()
    assert only_error(folder).startswith(f"{folder / 'default.toml'}:1: missing")
    with pytest.raises(RulesError):
        load_rules(folder)


def test_extends_missing(folder: Path) -> None:
    path = folder / "jurisdictions" / "us-wa.toml"
    edit(path, 'extends = "us-federal"', 'extends = "us-fed"')
    assert only_error(folder) == (f"{path}:{line_of(path, 'extends =')}: extends 'us-fed', "
                                  "but there is no jurisdictions/us-fed.toml")


def test_extends_loop(folder: Path) -> None:
    jdir = folder / "jurisdictions"
    (jdir / "x-a.toml").write_text('name = "A"\nextends = "x-b"\n', encoding="utf-8")
    (jdir / "x-b.toml").write_text('# b\nname = "B"\n\nextends = "x-a"\n', encoding="utf-8")
    errors = check_rules(folder)
    assert errors == [
        f"{jdir / 'x-a.toml'}:2: extends loops: x-a -> x-b -> x-a",
        f"{jdir / 'x-b.toml'}:4: extends loops: x-b -> x-a -> x-b",
    ]


def test_self_extends(folder: Path) -> None:
    path = folder / "jurisdictions" / "us-pa.toml"
    edit(path, 'extends = "us-federal"', 'extends = "us-pa"')
    line = line_of(path, "extends =")
    assert only_error(folder) == f"{path}:{line}: extends loops: us-pa -> us-pa"


def test_jurisdiction_mistakes(folder: Path) -> None:
    path = folder / "jurisdictions" / "us-ca.toml"
    edit(path, "co_consent_age = 12", "co_consent_age = 19\nveto = true")
    path.write_text(path.read_text(encoding="utf-8")
                    + "\n[categories.art]\nstanding_consent = false\n", encoding="utf-8")
    errors = check_rules(folder)
    assert errors == [
        f"{path}:{line_of(path, 'co_consent_age')}: co_consent_age (19) for mental_health "
        "must be below majority_age (18)",
        f"{path}:{line_of(path, 'veto')}: unknown key 'veto' in [categories.mental_health] "
        "(allowed: standing_consent, release_notice, co_consent_age, minor_veto, citation)",
        f"{path}:{line_of(path, '[categories.art]')}: category 'art' is not defined in "
        "default.toml",
    ]


def test_line_finder_ignores_multiline_strings_and_arrays(folder: Path) -> None:
    path = folder / "jurisdictions" / "us-il.toml"
    edit(path, 'name = "Illinois"',
         'name = """Illinois\nbogus = 1\n"""\nnote = [\n  "x = 1",\n]\nbogus = 2')
    errors = check_rules(folder)
    assert [e.split(" in ")[0] for e in errors] == [
        f"{path}:{line_of(path, 'note = [')}: unknown key 'note'",
        f"{path}:{line_of(path, 'bogus = 2')}: unknown key 'bogus'",
    ]


# -- classification ---------------------------------------------------------------------------


def test_therapy_tag_is_mental_health() -> None:
    matches = classify(SHIPPED, sender_tags=["therapy"], subject="Weekly note",
                       paragraphs_text="We met today.", attachment_names=[])
    assert [(m.category, m.sensitive) for m in matches] == [("mental_health", True)]
    assert matches[0].reason == "sender tag therapy -> category mental_health"
    tags, reasons = route(SHIPPED, matches)
    assert tags == ("counselor", "case-manager")
    assert reasons == ("routing: mental_health -> counselor, case-manager",)


def test_ot_words_route_to_ot_and_case_manager_only() -> None:
    matches = classify(
        SHIPPED, sender_tags=["provider"], subject="Progress this month",
        paragraphs_text=["Sam's SENSORY diet is working.", "Fine\n motor skills improved."],
        attachment_names=["OT_progress_March.pdf"])
    assert {m.category for m in matches} == {"ot_progress"}
    reasons = [m.reason for m in matches]
    assert "word 'sensory' in the body -> ot_progress" in reasons
    assert "word 'fine motor' in the body -> ot_progress" in reasons
    assert "attachment 'OT_progress_March.pdf' matches 'ot_*' -> ot_progress" in reasons
    assert not any(m.sensitive for m in matches)
    tags, _ = route(SHIPPED, matches)
    assert tags == ("ot", "case-manager")
    assert "teacher" not in tags


def test_whole_words_only() -> None:
    # "pilot" holds "ot", "assessments" is not "assessment", "grips" is not "grip".
    matches = classify(SHIPPED, subject="pilot program", paragraphs_text="grips, assessments",
                       sender_tags=[], attachment_names=["photo.jpg"])
    assert matches == []


def test_subject_words_and_several_categories() -> None:
    matches = classify(SHIPPED, subject="Medication change", sender_tags=["OT"],
                       paragraphs_text="Anxiety is lower since the dose changed.",
                       attachment_names=[])
    assert [m.category for m in matches] == ["mental_health", "ot_progress", "medication",
                                             "medication"]
    assert "word 'medication' in the subject -> medication" in [m.reason for m in matches]
    tags, reasons = route(SHIPPED, matches)
    assert tags == ("counselor", "case-manager", "ot", "nurse")
    assert len(reasons) == 3


def test_sensitive_without_routing_goes_to_nobody() -> None:
    matches = classify(SHIPPED, subject="", paragraphs_text="Attached: psychotherapy notes",
                       sender_tags=[], attachment_names=[])
    assert matches[0].category == "psychotherapy_notes"
    tags, reasons = route(SHIPPED, matches)
    assert tags == ()
    assert reasons[0].startswith("routing: psychotherapy_notes -> nobody by default")


def test_ssn_always_redacted_phone_suggested() -> None:
    text = ("SSN 123-45-6789, call 555-867-5309 or (312) 555-0199. DOB: 04/12/2014. "
            "Lives at 1428 Elm Street. Score 123-45-678 is not an SSN; nor is 000-12-3456.")
    always, suggestions = scan_patterns(SHIPPED, text)
    ssn = text.index("123-45-6789")
    assert always == {"us_ssn": ((ssn, ssn + 11),)}
    by_name = {(s.name, s.text) for s in suggestions}
    assert ("phone", "555-867-5309") in by_name
    assert ("phone", "(312) 555-0199") in by_name
    assert ("date_of_birth", "DOB: 04/12/2014") in by_name
    assert ("street_address", "1428 Elm Street") in by_name
    assert not any("123-45-6789" in s.text for s in suggestions)
    assert all(s.why for s in suggestions)


def test_rules_are_frozen() -> None:
    with pytest.raises(AttributeError):
        SHIPPED.hold = None  # type: ignore[misc]
    with pytest.raises(TypeError):
        SHIPPED.routing["ot_progress"] = ()  # type: ignore[index]


@settings(max_examples=150, deadline=None)
@given(
    tags=st.lists(st.text(max_size=12), max_size=4),
    subject=st.one_of(st.none(), st.text(max_size=80)),
    body=st.one_of(st.none(), st.text(max_size=400), st.lists(st.text(max_size=100), max_size=4)),
    names=st.lists(st.one_of(st.none(), st.text(max_size=30)), max_size=3),
)
def test_classify_never_raises(tags, subject, body, names) -> None:
    matches = classify(SHIPPED, sender_tags=tags, subject=subject, paragraphs_text=body,
                       attachment_names=names)
    route(SHIPPED, matches)
    always, suggestions = scan_patterns(SHIPPED, (subject or "") + (body if isinstance(body, str)
                                                                    else ""))
    for spans in always.values():
        assert all(0 <= a < b for a, b in spans)
    assert all(s.start < s.end for s in suggestions)
