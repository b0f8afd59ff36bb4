"""The prompt set `repq calib` ships: varied requests a chat model answers, written for repq.

Categories (the mixture's strata): ``knowledge`` (explanations across science, history, society,
everyday life), ``code`` (programming tasks in several languages), ``math`` (multi-step word
problems, generated from a fixed seed), ``reasoning`` (puzzles, planning, comparisons), ``writing``
(prose forms × subjects), ``chat`` (advice and everyday questions), ``rewrite`` (summarise or
transform a short passage given in the prompt) and ``multilingual`` (questions asked in, and
translations into, eight languages other than English).

Nothing here is taken from repq's evaluation texts (the Python tutorial, the Debian reference
manual, the fortunes collection), and the set deliberately has no system-administration or
quotation/joke prompts, so that those held-out domains stay unseen.  The set is a pure function of
this file: :func:`builtin_prompts` returns the same list, in the same order, every time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class Prompt:
    category: str
    text: str

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.text}]


TOPICS = (
    "plate tectonics", "the water cycle", "how vaccines work", "black holes", "photosynthesis",
    "the printing press", "the Roman Republic", "the Silk Road", "the industrial revolution",
    "supply and demand", "compound interest", "inflation", "the immune system", "sleep and memory",
    "antibiotic resistance", "renewable energy", "nuclear fission", "electric motors", "GPS satellites",
    "the human heart", "coral reefs", "bird migration", "volcanoes", "tides", "the speed of light",
    "DNA replication", "evolution by natural selection", "the periodic table", "climate feedback loops",
    "the Renaissance", "the invention of writing", "ancient Egyptian pyramids", "the Ottoman Empire",
    "the Meiji restoration", "the history of jazz", "impressionist painting", "the Olympic Games",
    "chess openings", "how bread rises", "fermentation", "the stock market", "central banks",
    "public key cryptography", "how search engines rank pages", "the internet's packet routing",
    "machine learning", "neural networks", "compilers", "relational databases", "version control",
    "the placebo effect", "cognitive biases", "language acquisition in children", "the scientific method",
    "statistical significance", "the Fibonacci sequence", "prime numbers", "probability", "game theory",
    "urban planning", "the history of the bicycle", "how airplanes fly", "rainbows", "earthquakes",
    "glaciers", "desert ecosystems", "honeybees", "octopus intelligence", "the Moon landing",
    "Mars exploration", "the Great Barrier Reef", "the Amazon rainforest", "human digestion",
    "muscle growth", "nutrition labels", "first aid for burns", "copyright law", "democracy in Athens",
    "the French Revolution", "the Cold War", "the European Union", "the United Nations",
)

KNOWLEDGE_TEMPLATES = (
    "Explain {t} to a curious teenager.",
    "What are common misconceptions about {t}?",
    "Write a short encyclopedia-style paragraph about {t}.",
    "Give three questions with answers that test someone's understanding of {t}.",
)

CODE_TASKS = (
    "a function that reverses the words of a sentence",
    "a function that checks whether a string is a palindrome, ignoring case and punctuation",
    "binary search over a sorted array",
    "a stack class with push, pop and peek",
    "a function that counts word frequencies in a text and returns the ten most common",
    "merge sort",
    "a function that validates an email address without regular expressions",
    "a function that converts a Roman numeral to an integer",
    "a simple LRU cache",
    "a function that flattens a nested list",
    "a function that computes the greatest common divisor of two numbers",
    "a function that parses a CSV line with quoted fields",
    "a linked list with insertion and deletion",
    "a function that finds all prime numbers below n with a sieve",
    "a function that returns the longest common prefix of a list of strings",
    "a matrix multiplication routine",
    "a function that formats a number of seconds as hours, minutes and seconds",
    "a function that checks whether brackets in an expression are balanced",
    "a breadth-first search on a graph given as an adjacency list",
    "a function that computes the moving average of a list",
    "a function that converts Celsius to Fahrenheit for a whole table",
    "a rate limiter that allows N calls per second",
    "a function that removes duplicates from a list while keeping the order",
    "a tiny tokenizer for arithmetic expressions",
    "a function that computes the Levenshtein distance of two strings",
    "a queue built from two stacks",
    "a function that rotates an image matrix by 90 degrees",
    "a function that checks whether a year is a leap year",
    "a binary tree with in-order traversal",
    "a function that finds the k largest numbers in a list",
)
LANGUAGES = ("Python", "JavaScript", "C", "Rust", "Go", "Java", "C++", "TypeScript")
CODE_EXTRA = (
    "What is the difference between a list and a tuple in Python, and when should I use each?",
    "Explain what a race condition is with a small example.",
    "Why does floating point arithmetic give 0.1 + 0.2 != 0.3?",
    "What does 'Big O of n log n' mean? Give an example algorithm.",
    "Write a SQL query that lists the five customers with the highest total order value.",
    "Write a SQL query that finds employees earning more than their manager.",
    "Explain the difference between an abstract class and an interface.",
    "What is recursion, and what is a base case? Show an example.",
    "Review this function and suggest improvements:\n\ndef avg(l):\n    s = 0\n    for i in range(len(l)):\n"
    "        s = s + l[i]\n    return s / len(l)",
    "Find the bug:\n\nfunction sum(arr) {\n  let total;\n  for (const x of arr) total += x;\n  return total;\n}",
    "Explain what this regular expression matches: ^[A-Z][a-z]+ [0-9]{4}$",
    "What is the difference between unit tests and integration tests?",
    "Explain how a hash map handles collisions.",
    "Write a Python class that represents a bank account with deposits and withdrawals.",
    "What is dependency injection, in plain words?",
    "Explain the difference between pass-by-value and pass-by-reference.",
)

REASONING = (
    "A farmer has to cross a river with a wolf, a goat and a cabbage. The boat carries him and one "
    "item. How does he get everything across safely? Explain each step.",
    "If all bloops are razzies and all razzies are lazzies, are all bloops definitely lazzies? Explain.",
    "You have two ropes that each burn for exactly one hour, unevenly. How can you measure 45 minutes?",
    "Three friends split a restaurant bill of 90 dollars, but one of them paid 40. How much does each "
    "of the others owe him?",
    "Plan a three-day trip to a city you have never visited: what do you research first and why?",
    "Which is heavier, a kilogram of feathers or a kilogram of iron? Explain the trick.",
    "A bat and a ball cost 1.10 in total. The bat costs 1.00 more than the ball. What does the ball "
    "cost? Reason carefully.",
    "Sort these by size, smallest first, and explain: an ant, a mouse, a horse, a bacterium, a whale.",
    "What are the advantages and disadvantages of working from home? Weigh them.",
    "If it takes five machines five minutes to make five widgets, how long do 100 machines take to "
    "make 100 widgets?",
    "Decide between renting and buying a home: list the factors and how to weigh them.",
    "A clock shows 3:15. What is the angle between the hour and the minute hands?",
    "Why might a company choose to lower its prices? Give several reasons.",
    "Alice is older than Bob. Carol is younger than Bob. Dan is older than Alice. Who is the youngest?",
    "A snail climbs 3 meters up a well each day and slides 2 meters back each night. The well is 10 "
    "meters deep. On which day does it get out?",
    "Explain why correlation does not imply causation, with an example.",
    "You must schedule four meetings in two rooms over three hours without conflicts. How do you "
    "approach it?",
    "Is it better to study in one long session or several short ones? Argue from evidence.",
    "What would happen to the seasons if the Earth's axis were not tilted?",
    "A store sells pens in packs of 3 and 5. Can you buy exactly 7 pens? 8? 11? Explain.",
)

WRITING_FORMS = (
    "a short story", "a poem", "a letter to a friend", "a dialogue between two characters",
    "a product description", "a restaurant review", "a short speech", "a diary entry",
    "a news report", "a children's bedtime story", "a travel blog post", "a persuasive paragraph",
)
WRITING_SUBJECTS = (
    "a lighthouse keeper during a storm", "the first day at a new school", "a robot learning to paint",
    "a city garden in spring", "a lost umbrella", "climbing a mountain at dawn", "a bakery at midnight",
    "a message found in a bottle", "a train journey through snow", "an old map in an attic",
    "a family reunion", "a dog who hates rain", "the last day of summer", "a market in a busy port",
    "a scientist's big discovery", "a chess match between rivals", "a village without electricity",
    "a new electric bicycle", "learning to swim as an adult", "a festival of lanterns",
)

CHAT = (
    "How can I get better at waking up early?", "What should I pack for a week-long hiking trip?",
    "Give me tips for a job interview at a small company.", "How do I politely decline a wedding invitation?",
    "What's a good way to start learning to draw?", "How can I keep houseplants alive?",
    "I have chicken, rice and spinach. What can I cook tonight?", "How do I make a monthly budget?",
    "What are good habits for protecting my eyes when I work at a screen?",
    "How can I become more confident speaking in public?", "Suggest a weekly exercise plan for a beginner.",
    "How do I write a thank-you note to a teacher?", "What are the signs of burnout and what helps?",
    "How do I choose a good second-hand car?", "What is a healthy breakfast that takes five minutes?",
    "How can I help a friend who is going through a hard time?", "How do I learn a new language quickly?",
    "What should I know before adopting a cat?", "How can I reduce the waste my household produces?",
    "Give me ideas for a rainy weekend with children.", "How do I negotiate a higher salary?",
    "How do I keep a conversation going with someone I just met?", "What makes a good password?",
    "How can I focus better when studying?", "Recommend a routine for a relaxing evening.",
    "How do I prepare for my first marathon?", "What is the best way to memorise a speech?",
    "How do I deal with a noisy neighbour?", "How should I organise my email inbox?",
    "What questions should I ask when visiting an apartment to rent?",
)

PASSAGES = (
    "The town council met on Tuesday to discuss the new bicycle lanes. Supporters said the lanes "
    "would reduce traffic and make streets safer for children. Shop owners worried that losing "
    "parking spaces would hurt their business. After two hours of debate, the council agreed to "
    "test the lanes on one street for six months before deciding.",
    "Honeybees communicate the location of flowers with a waggle dance. The angle of the dance "
    "relative to vertical shows the direction of the food relative to the sun, and the length of "
    "the waggle run shows the distance. Other bees follow the dancer and then fly out to the flowers.",
    "Our quarterly results were mixed. Sales grew by eight percent, mostly in the online store, but "
    "costs rose faster because of higher shipping prices. We plan to renegotiate delivery contracts "
    "and to invest in a second warehouse closer to our largest customers.",
    "The museum's new exhibition brings together two hundred maps drawn between 1500 and 1800. "
    "Visitors can see how coastlines became more accurate as sailors measured longitude better, and "
    "how mapmakers filled unknown regions with imaginary mountains and sea monsters.",
    "Regular physical activity lowers the risk of heart disease, improves mood and helps people sleep. "
    "Adults are advised to get at least 150 minutes of moderate exercise a week, such as brisk "
    "walking, and to add muscle-strengthening activities on two days.",
    "The volunteers cleaned the beach from seven in the morning until noon. They collected forty bags "
    "of rubbish, mostly plastic bottles and fishing nets, and recorded every item so that researchers "
    "could track where the waste came from.",
    "Maria opened her small bakery ten years ago with one oven and a recipe from her grandmother. "
    "Today she employs twelve people and sells bread to three restaurants, but she still starts every "
    "morning at four o'clock by shaping the first loaves herself.",
    "A new study followed two thousand students for three years. Those who slept at least eight "
    "hours performed better in mathematics tests, even after accounting for family income and "
    "school quality. The authors caution that the study shows an association, not a cause.",
)
REWRITE_TASKS = (
    "Summarise this in one sentence:\n\n{p}",
    "Rewrite this in a formal tone:\n\n{p}",
    "List the key facts of this text as bullet points:\n\n{p}",
    "Write three questions a reader might ask after reading this:\n\n{p}",
    "Explain this text to a ten-year-old:\n\n{p}",
)

MULTILINGUAL = (
    ("French", "Explique comment fonctionne un arc-en-ciel."),
    ("French", "Quels sont les avantages du vélo en ville ?"),
    ("French", "Écris une courte histoire sur un chat qui voyage en train."),
    ("French", "Donne-moi une recette simple de crêpes."),
    ("German", "Erkläre, warum der Himmel blau ist."),
    ("German", "Was sind gute Tipps, um eine neue Sprache zu lernen?"),
    ("German", "Schreibe ein kurzes Gedicht über den Herbst."),
    ("German", "Wie funktioniert eine Wärmepumpe?"),
    ("Spanish", "¿Cuáles son las causas del cambio climático?"),
    ("Spanish", "Escribe una carta corta para invitar a un amigo a cenar."),
    ("Spanish", "Explica qué es la fotosíntesis de forma sencilla."),
    ("Spanish", "¿Cómo puedo organizar mejor mi tiempo?"),
    ("Italian", "Spiega come si prepara un buon caffè espresso."),
    ("Italian", "Quali sono le città più importanti del Rinascimento italiano?"),
    ("Italian", "Scrivi una breve descrizione di una giornata al mare."),
    ("Portuguese", "Explique o que é inflação e por que ela acontece."),
    ("Portuguese", "Quais são os benefícios de ler todos os dias?"),
    ("Portuguese", "Escreva uma pequena história sobre um pescador."),
    ("Dutch", "Leg uit hoe windmolens elektriciteit opwekken."),
    ("Dutch", "Wat zijn goede gewoonten voor een gezonde slaap?"),
    ("Russian", "Объясни, почему времена года сменяют друг друга."),
    ("Russian", "Напиши короткий рассказ о зимнем лесе."),
    ("Russian", "Какие советы ты дашь начинающему программисту?"),
    ("Chinese", "请解释一下什么是人工智能。"),
    ("Chinese", "写一首关于月亮的短诗。"),
    ("Chinese", "学习数学有哪些好方法？"),
    ("Japanese", "日本の四季について説明してください。"),
    ("Japanese", "健康的な朝ごはんのアイデアを教えてください。"),
    ("Polish", "Wyjaśnij, jak działa szczepionka."),
    ("Polish", "Napisz krótki list do przyjaciela o wakacjach."),
)
TRANSLATE_SENTENCES = (
    "The library opens at nine and closes at six.",
    "Could you tell me where the train station is?",
    "We are planning a picnic by the lake on Saturday.",
    "The weather will be sunny tomorrow, with a light wind.",
    "Please remember to water the plants while I am away.",
    "This soup tastes even better the next day.",
    "She has been learning the piano for three years.",
    "The meeting has been moved to Thursday afternoon.",
)
TARGET_LANGUAGES = ("French", "German", "Spanish", "Italian", "Portuguese", "Dutch", "Chinese", "Japanese")


def _math_problems(n: int, seed: int = 20261130) -> list[str]:
    """Multi-step word problems with small numbers, from a fixed seed (the set never changes)."""
    rng = random.Random(seed)
    names = ("Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Lena")
    items = (("apples", 0.5), ("notebooks", 2.5), ("tickets", 12), ("books", 8), ("coffees", 3.2), ("shirts", 15))
    out = []
    for i in range(n):
        a, b = rng.sample(names, 2)
        kind = i % 8
        if kind == 0:
            it, price = rng.choice(items)
            k, m = rng.randint(3, 12), rng.randint(2, 9)
            out.append(f"{a} buys {k} {it} at {price} dollars each and {b} buys {m} more. How much do they "
                       "spend together? Show your steps.")
        elif kind == 1:
            v, t = rng.randint(40, 110), rng.randint(2, 6)
            out.append(f"A car travels at {v} km/h for {t} hours, then at {v - 20} km/h for one more hour. "
                       "How far does it go, and what is its average speed? Think step by step.")
        elif kind == 2:
            p, d = rng.randint(20, 200), rng.choice((10, 15, 20, 25, 30))
            out.append(f"A jacket costs {p} dollars. It is discounted by {d}% and then a 5% tax is added. "
                       "What is the final price? Explain.")
        elif kind == 3:
            w, h = rng.randint(3, 15), rng.randint(3, 15)
            out.append(f"A garden is {w} m by {h} m. A path 1 m wide runs around it on the outside. What "
                       "is the area of the path? Work it out carefully.")
        elif kind == 4:
            x, y = rng.randint(5, 40), rng.randint(2, 9)
            out.append(f"{a} is {x} years old. In {y} years {a} will be twice as old as {b} is then. How "
                       f"old is {b} now? Solve step by step.")
        elif kind == 5:
            n1, n2 = rng.randint(1, 12), rng.randint(1, 12)
            out.append(f"Add the fractions {n1}/{n1 + rng.randint(1, 9)} and {n2}/{n2 + rng.randint(2, 11)}, and "
                       "simplify the result. Show each step.")
        elif kind == 6:
            c, r = rng.randint(1000, 9000), rng.choice((2, 3, 4, 5))
            out.append(f"{a} saves {c} dollars at {r}% interest compounded yearly. How much is there after "
                       "three years? Show the calculation for each year.")
        else:
            t1, t2 = rng.randint(2, 8), rng.randint(3, 12)
            out.append(f"{a} can paint a fence in {t1} hours and {b} in {t2} hours. Working together, how "
                       "long do they take? Explain your reasoning.")
    return out


@cache
def _build() -> tuple[Prompt, ...]:
    out: list[Prompt] = []
    for j, t in enumerate(TOPICS):
        for k, tpl in enumerate(KNOWLEDGE_TEMPLATES):
            if (j + k) % 2 == 0:   # half of the topic × template grid, alternating
                out.append(Prompt("knowledge", tpl.format(t=t)))
    for j, task in enumerate(CODE_TASKS):
        for k in range(3):
            out.append(Prompt("code", f"Write {task} in {LANGUAGES[(j + 3 * k) % len(LANGUAGES)]}, "
                                      "with a short explanation."))
    out += [Prompt("code", s) for s in CODE_EXTRA]
    out += [Prompt("math", s) for s in _math_problems(96)]
    out += [Prompt("reasoning", s) for s in REASONING]
    for j, form in enumerate(WRITING_FORMS):
        for k in range(6):
            out.append(Prompt("writing", f"Write {form} about {WRITING_SUBJECTS[(5 * j + k) % len(WRITING_SUBJECTS)]}."))
    out += [Prompt("chat", s) for s in CHAT]
    for j, p in enumerate(PASSAGES):
        for k, tpl in enumerate(REWRITE_TASKS):
            if (j + k) % 5 < 3:
                out.append(Prompt("rewrite", tpl.format(p=p)))
    out += [Prompt("multilingual", s) for _, s in MULTILINGUAL]
    for j, s in enumerate(TRANSLATE_SENTENCES):
        for k in range(3):
            out.append(Prompt("multilingual", f"Translate into {TARGET_LANGUAGES[(j + 3 * k) % len(TARGET_LANGUAGES)]}: "
                                              f"\"{s}\""))
    seen: set[str] = set()
    return tuple(p for p in out if not (p.text in seen or seen.add(p.text)))


def builtin_prompts() -> list[Prompt]:
    """repq's prompt set, interleaved so that every prefix of it mixes the categories."""
    by_cat: dict[str, list[Prompt]] = {}
    for p in _build():
        by_cat.setdefault(p.category, []).append(p)
    # round-robin by category share: a prefix of any length has roughly the set's proportions
    total = sum(len(v) for v in by_cat.values())
    pos = {c: 0 for c in by_cat}
    out = []
    for _ in range(total):
        c = min(by_cat, key=lambda c: ((pos[c] + 0.5) / len(by_cat[c]), c) if pos[c] < len(by_cat[c]) else (2.0, c))
        out.append(by_cat[c][pos[c]])
        pos[c] += 1
    return out
