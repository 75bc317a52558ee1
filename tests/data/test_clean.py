import unicodedata

from scalelm.data.clean import clean_text


def test_nfc():
    decomposed = "Cafe\u0301"
    assert clean_text(decomposed) == "Café" and unicodedata.is_normalized("NFC", clean_text(decomposed))


def test_control_and_invisible_characters_go():
    assert clean_text("a\x00b\x07c\x1bd\u200be\ufefff\u00adg") == "abcdefg"


def test_zero_width_joiners_stay():
    assert clean_text("👩\u200d💻") == "👩\u200d💻"


def test_line_endings_unified_and_blank_lines_collapsed():
    assert clean_text("one\r\ntwo\rthree\u2028four\n\n\n\n\nfive") == "one\ntwo\nthree\nfour\n\nfive"


def test_exotic_spaces_and_trailing_whitespace():
    assert clean_text("a\u00a0b\u3000c   \nd\t \ne") == "a b c\nd\ne"


def test_indentation_inside_lines_is_kept():
    code = "def f():\n    return 1"
    assert clean_text(code) == code


def test_strips_the_ends():
    assert clean_text("\n\n  text  \n\n") == "text"
