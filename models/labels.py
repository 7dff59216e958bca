"""The demo model's labels, each defined as a group of ImageNet-1k classes.

The demo head is trained by distillation: the teacher is EfficientNet-Lite0's
own ImageNet classifier, and a label's target is the summed softmax
probability of its classes. ImageNet has no "person" class; that label is
taught through the classes that show people or what they wear (uniforms,
suits, gowns, groom, scuba diver, ballplayer...), which is a proxy and is
measured as such in the model card.
"""

from __future__ import annotations


def _span(first: int, last: int) -> list[int]:
    return list(range(first, last + 1))


GROUPS: dict[str, list[int]] = {
    "person": [399, 400, 411, 445, 451, 452, 457, 459, 465, 474, 515, 518, 560, 568, 578, 601, 608, 610, 614,
               617, 638, 639, 652, 655, 667, 689, 697, 735, 775, 808, 824, 834, 837, 841, 842, 869, 887, 903,
               906, 981, 982, 983],
    "cat": _span(281, 285),
    "dog": _span(151, 268),
    "bird": _span(7, 24) + _span(80, 100) + _span(127, 146),
    "vehicle": [403, 404, 405, 407, 436, 444, 466, 468, 472, 484, 510, 511, 547, 554, 555, 565, 569, 573, 575,
                576, 609, 625, 627, 628, 654, 656, 657, 661, 665, 670, 671, 675, 705, 717, 724, 734, 744, 751,
                757, 779, 780, 812, 814, 817, 820, 829, 833, 864, 866, 867, 870, 871, 874, 880, 895, 914],
    "drink": [440, 441, 503, 504, 505, 550, 572, 737, 849, 898, 899, 901, 907, 966, 967, 968, 969],
    "food": _span(924, 957) + _span(959, 965),
    "furniture": [423, 431, 453, 492, 493, 495, 516, 520, 526, 532, 548, 559, 564, 648, 703, 765, 831, 857, 894],
    "plant": [738, 883, 984, 985, 986],
    "building": [415, 424, 425, 442, 449, 454, 467, 483, 497, 498, 500, 509, 538, 580, 582, 624, 660, 663, 668,
                 698, 727, 743, 762, 788, 832, 853, 858, 860, 865, 873, 900, 915],
    "electronics": [482, 485, 487, 508, 527, 590, 598, 605, 620, 632, 662, 664, 673, 681, 713, 732, 742, 754,
                    759, 761, 782, 810, 848, 851, 878],
    "lamp": [619, 846],
}

LABELS: list[str] = list(GROUPS)


def check_groups() -> None:
    seen: dict[int, str] = {}
    for label, classes in GROUPS.items():
        for c in classes:
            if not 0 <= c < 1000:
                raise ValueError(f"{label}: class {c} is outside ImageNet-1k")
            if c in seen:
                raise ValueError(f"class {c} is in both {seen[c]} and {label}")
            seen[c] = label


check_groups()
