"""Graders for tiny random models, which never answer right: each grades by the number ending an item's id (and the
prompt's mode), so that every class and difficulty label occurs. Named in a task spec (``task.grader``)."""


def number(item) -> int:
    return int(item.qid.rsplit("/", 1)[-1])


def parity(item, response, mode):
    return "x", number(item) % 2 == 0


def by_number_mod3(item, response, mode):
    """0: both modes right, 1: only slow right, 2: both wrong."""
    return "x", {0: True, 1: mode == "slow", 2: False}[number(item) % 3]


def by_number_mod4(item, response, mode):
    """0: both right (label 0), 1: only slow right (75), 2: both wrong (100), 3: only fast right (0 or 25)."""
    return "x", {0: True, 1: mode == "slow", 2: False, 3: mode == "fast"}[number(item) % 4]


def by_text(item, response, mode):
    """Depends on the generated text (and the item, so both grades occur even when a tiny model's texts agree)."""
    return "", (sum(map(ord, response)) + number(item)) % 2 == 0


def halfway(response, prediction, token_ends):
    """A switch label for text that never writes a result: half of each answer counts as settled."""
    return len(token_ends) // 2 or None


FLIPPED: set[str] = set()  # question ids whose grade ``flipped`` inverts (a test fills it)


def flipped(item, response, mode):
    """``by_number_mod4``, inverted for the ids in ``FLIPPED``: the same answers with other labels."""
    prediction, correct = by_number_mod4(item, response, mode)
    return prediction, correct != (item.qid in FLIPPED)


def two_arguments(item, response):
    """A grader with the wrong signature (no mode)."""
    return "", True
