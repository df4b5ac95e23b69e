"""Built-in texts: calibration data for quantization and the evaluation text of the quality gates.

Written for this project (no third-party text, no licence to carry). The calibration text is
varied on purpose — narrative, instructions, dialogue, code, numbers, lists — so that every
projection of a general-purpose model sees typical activations; the evaluation text is a
different set of passages, so that the gate does not measure the model on what it was
calibrated on. Both are small: the demo and the tests run offline. For a real model, give
``calibration.dataset`` (a jsonl/txt file or a Hub dataset) with text like what it will serve.
"""
from __future__ import annotations

CALIBRATION_TEXT = """\
The harbour town woke slowly. Fishing boats came in before sunrise, their decks stacked with crates of ice, and \
the gulls followed them all the way to the pier. By seven the bakery on the corner had sold its first tray of \
bread, and the woman who ran the ferry office had unlocked the shutters, wiped the counter and written the day's \
crossings on the board: nine fifteen, twelve thirty, four o'clock, and the last boat at seven in the evening.

Ingredients for a simple tomato soup: two tablespoons of olive oil, one onion, two cloves of garlic, a kilogram \
of ripe tomatoes, half a litre of vegetable stock, salt, pepper and a handful of basil. Warm the oil in a heavy \
pan, soften the chopped onion for eight minutes, add the garlic for one more minute, then the tomatoes and the \
stock. Simmer for twenty minutes, blend until smooth, season to taste and serve with the basil torn on top.

User: My laptop fan is loud all the time, even when nothing is running. What can I check?
Assistant: Start with the task manager and sort processes by CPU usage; a background update or an indexing \
service is a common cause. If the usage is low, clean the air vents with compressed air, make sure the laptop \
sits on a hard surface, and check whether the manufacturer offers a firmware update for the fan controller.
User: The vents were full of dust. It is much quieter now, thank you.

def merge_intervals(intervals):
    \"\"\"Merge overlapping [start, end] intervals and return them sorted.\"\"\"
    result = []
    for start, end in sorted(intervals):
        if result and start <= result[-1][1]:
            result[-1][1] = max(result[-1][1], end)
        else:
            result.append([start, end])
    return result

print(merge_intervals([[1, 3], [2, 6], [8, 10], [15, 18]]))  # [[1, 6], [8, 10], [15, 18]]

SELECT customer_id, COUNT(*) AS orders, SUM(total) AS revenue
FROM orders
WHERE created_at >= DATE '2024-01-01'
GROUP BY customer_id
HAVING COUNT(*) > 3
ORDER BY revenue DESC
LIMIT 10;

Photosynthesis turns light into chemical energy. In the chloroplasts of a leaf, chlorophyll absorbs mostly red \
and blue light; the energy splits water molecules, releasing oxygen, and drives the reactions that fix carbon \
dioxide into sugars. A single large tree can release enough oxygen in a growing season for several people, \
while storing carbon in its wood, roots and the soil around them.

In 1859 a solar storm lit up the night sky so brightly that people in the Rocky Mountains got up to make \
breakfast, thinking it was morning. Telegraph lines sparked, and some operators found they could send messages \
with their batteries disconnected, powered by the currents the storm induced in the wires.

Quarterly report, third quarter: revenue grew 12 percent to 4.8 million, driven by the subscription segment, \
which now accounts for 61 percent of sales. Operating costs rose 7 percent, mainly from two new support \
centres. The gross margin improved from 38.5 to 41.2 percent. Cash at the end of the quarter was 2.3 million.

Steps to replace a bicycle inner tube:
1. Shift to the smallest cog and open the brake.
2. Remove the wheel and let the remaining air out.
3. Lever one side of the tyre off the rim and pull out the tube.
4. Run your fingers carefully inside the tyre to find the thorn or glass that caused the puncture.
5. Inflate the new tube slightly, fit it, push the tyre back on and pump it to the pressure written on the sidewall.

"Are you sure this is the right road?" asked Mira, folding the map for the third time.
"Sure enough," said her brother. "The river was on our left an hour ago, and it is still on our left."
"Rivers bend," she said, and pointed at the bridge ahead, which was not on the map at all.

The French Revolution began in 1789 and reshaped Europe. The storming of the Bastille on 14 July became its \
symbol; the Declaration of the Rights of Man and of the Citizen proclaimed that men are born and remain free \
and equal in rights. The years that followed brought a republic, war with much of Europe, the Terror, and \
finally the rise of Napoleon Bonaparte, who crowned himself emperor in 1804.

To solve 3x + 7 = 22, subtract 7 from both sides to get 3x = 15, then divide by 3: x = 5. Check: 3 * 5 + 7 = 22. \
The area of a circle with a radius of 4 centimetres is pi times 16, about 50.27 square centimetres. If a train \
travels 180 kilometres in 2 hours and 15 minutes, its average speed is 80 kilometres per hour.

{"id": 4182, "name": "standing desk", "price": 349.0, "in_stock": true, "tags": ["office", "ergonomic"], \
"dimensions": {"width_cm": 140, "depth_cm": 70, "height_cm": [72, 120]}}

Dear Mr. Alvarez, thank you for your letter of 3 March. I am pleased to confirm that the replacement parts \
have been shipped and should reach you by Friday. Should anything be missing, please call our service desk \
and quote the order number at the top of this letter. With kind regards, Helen Brooks, Customer Service.

Le marché ouvre à huit heures. On y trouve des fruits, des légumes, du fromage et du pain frais. \
Der Zug nach Berlin hat zehn Minuten Verspätung. El museo está cerrado los lunes.

A binary search halves the range at every step, so a sorted list of a million items needs at most twenty \
comparisons. It works only when the data is sorted and the elements can be reached by index in constant time; \
on a linked list, reaching the middle element already costs a linear walk.
"""

EVAL_TEXT = """\
The library stood at the end of a narrow street, its windows glowing late into the evening. Students came \
with their laptops and stacks of books, and the old librarian knew most of them by name. When the heating \
failed one winter, she brought blankets from home and kept the doors open until the last bus had gone.

Water boils at 100 degrees Celsius at sea level, but at lower temperatures on a mountain, because the air \
pressure is lower. That is why pasta takes longer to cook at high altitude: the water is boiling, yet it is \
not as hot as it would be by the sea.

Question: A shop sells pencils in packs of 12. How many packs are needed for 150 pencils?
Answer: 150 divided by 12 is 12.5, so 13 packs are needed, leaving 6 pencils spare.

def is_palindrome(text):
    cleaned = [c.lower() for c in text if c.isalnum()]
    return cleaned == cleaned[::-1]

The meeting was moved to Thursday at two o'clock. Please bring the budget figures for the spring campaign, \
the list of suppliers we contacted in January, and any questions about the new travel policy.

Honey never spoils when it is sealed: its low water content and acidity stop bacteria from growing. Jars \
found in ancient tombs were still edible after thousands of years.
"""


def eval_passages() -> list[str]:
    """The evaluation text split into its paragraphs: one prompt each."""
    return [p.strip() for p in EVAL_TEXT.split("\n\n") if p.strip()]
