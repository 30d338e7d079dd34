"""Write ``prompts.jsonl``: the bundled prompt set, written for unialign.

Run ``python tools/make_prompts.py`` (or ``python -m tools.make_prompts``) from a checkout to regenerate
``src/unialign/data/bundled/prompts.jsonl``. Four categories:

- ``instruction``: everyday requests, hand-written; no checkable answer.
- ``factual``: short questions with known answers; ``facts`` is a list of required facts, each a
  list of accepted aliases (any alias satisfies the fact).
- ``arithmetic``: word problems from varied templates with small numbers; ``answer`` is computed
  here, never typed by hand.
- ``format``: requests with one machine-readable ``constraint`` that the offline judge can check;
  the judge's text parser must read the same constraint from the prompt (a test checks this).

Output is deterministic (fixed seed), so regenerating gives the same file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# The checkout's bundled prompt file, next to the listwise rows made from it.
PROMPTS = Path(__file__).resolve().parent.parent / "src" / "unialign" / "data" / "bundled" / "prompts.jsonl"

INSTRUCTIONS = [
    "Write a short poem about the sea.",
    "Give me a tip for sleeping better.",
    "Explain what a rainbow is to a child.",
    "Write a friendly message to welcome a new neighbor.",
    "Describe a sunny morning at the beach.",
    "Suggest a simple breakfast I can make in five minutes.",
    "Write a thank-you note to a teacher.",
    "Explain why we should drink water every day.",
    "Tell me how to make a cup of tea.",
    "Write a short story about a lost cat who finds its way home.",
    "Describe your ideal weekend.",
    "Explain how to plant a seed in a pot.",
    "Write a birthday message for a friend.",
    "Give me advice for a job interview.",
    "Explain what recycling means.",
    "Write a short description of autumn.",
    "Tell me how to wash my hands properly.",
    "Write an apology note for being late to a meeting.",
    "Explain why exercise is good for you.",
    "Describe a busy city street.",
    "Suggest a name for a small bakery.",
    "Write a haiku about snow.",
    "Explain how a bicycle works in simple words.",
    "Give me a tip for saving money.",
    "Write a short invitation to a picnic.",
    "Explain what a computer does.",
    "Describe the taste of a lemon.",
    "Tell me how to make a paper airplane.",
    "Write a kind reply to a friend who feels sad.",
    "Explain why the sky looks blue.",
    "Write a short review of a pizza restaurant.",
    "Give me an idea for a rainy day activity.",
    "Explain what a volcano is.",
    "Write a short speech to open a school fair.",
    "Describe a forest at night.",
    "Tell me how to stay calm before a test.",
    "Write a message asking a coworker for help.",
    "Explain what friendship means.",
    "Suggest a healthy snack for the afternoon.",
    "Write a short poem about the moon.",
    "Explain how to brush your teeth well.",
    "Describe a cozy living room.",
    "Write a postcard from a trip to the mountains.",
    "Give me advice for learning a new language.",
    "Explain what the internet is.",
    "Write a short note reminding my roommate to buy milk.",
    "Explain why trees are important.",
    "Describe the sound of rain on a roof.",
    "Tell me how to care for a houseplant.",
    "Write a cheerful good morning message.",
    "Explain what a budget is.",
    "Write a short fable about a fox and a crow.",
    "Give me a tip for writing a clear email.",
    "Explain how the seasons change.",
    "Describe a farmers market on a Saturday.",
    "Write a short motivational quote about hard work.",
    "Tell me how to fold a T-shirt neatly.",
    "Explain what a dictionary is used for.",
    "Write a short letter to your future self.",
    "Suggest a fun game for a family evening.",
    "Explain why we need sleep.",
    "Describe a snowy village.",
    "Write a product description for a blue coffee mug.",
    "Give me advice for making new friends at school.",
    "Explain how a library works.",
    "Write a short poem about a cat.",
    "Tell me how to boil an egg.",
    "Explain what a map is for.",
    "Write a note to thank a neighbor for watering my plants.",
    "Describe the feeling of finishing a long race.",
    "Explain what a healthy diet looks like.",
    "Write a short dialogue between a customer and a shop owner.",
    "Give me a tip for keeping my desk tidy.",
    "Explain why bees are important.",
    "Describe a train journey through the countryside.",
    "Write a short welcome message for a website.",
    "Tell me how to make a simple salad.",
    "Explain what electricity is in simple terms.",
    "Write a limerick about a dog.",
    "Suggest a way to spend less time on my phone.",
    "Explain how to read a clock.",
    "Describe a quiet library.",
    "Write a short announcement that the office is closed on Friday.",
    "Give me advice for my first day at a new job.",
    "Explain what clouds are made of.",
    "Write a short bedtime story about a sleepy bear.",
    "Tell me how to cross the street safely.",
    "Explain why reading books is useful.",
    "Describe a garden in spring.",
    "Write a polite message declining an invitation.",
    "Explain what a vaccine does.",
    "Suggest a title for a story about a brave mouse.",
    "Write a short poem about the wind.",
    "Give me a tip for remembering names.",
    "Explain what a recipe is.",
    "Describe the smell of fresh bread.",
    "Write a short message to congratulate someone on a new baby.",
    "Tell me how to pack a suitcase for a weekend trip.",
    "Explain how plants drink water.",
    "Write a slogan for a clean park campaign.",
    "Describe an old lighthouse.",
    "Explain why it is polite to say thank you.",
    "Write a short note for a lost umbrella poster.",
    "Give me advice for studying for an exam.",
    "Explain what a calendar is used for.",
    "Describe a river in the mountains.",
    "Write a short poem about friendship.",
    "Tell me how to set a table for dinner.",
    "Explain why we wear seatbelts.",
    "Write a short ad for a used bicycle.",
    "Suggest a hobby for someone who likes being outdoors.",
    "Explain what a museum is.",
    "Describe a birthday party for a child.",
    "Write a message to a friend who just moved to a new city.",
    "Give me a tip for drinking more water.",
    "Explain how a thermometer works.",
    "Write a short story about a robot who learns to paint.",
    "Describe the first snow of winter.",
    "Explain why we should turn off lights when leaving a room.",
    "Write a short thank-you message to a bus driver.",
]

# (question, facts): every inner list is one required fact; any alias in it satisfies the fact.
FACTUAL = [
    ("What is the capital of France?", [["paris"]]),
    ("What is the capital of Japan?", [["tokyo"]]),
    ("What is the capital of Italy?", [["rome"]]),
    ("What is the capital of Spain?", [["madrid"]]),
    ("What is the capital of Germany?", [["berlin"]]),
    ("What is the capital of Canada?", [["ottawa"]]),
    ("What is the capital of Australia?", [["canberra"]]),
    ("What is the capital of Egypt?", [["cairo"]]),
    ("What is the capital of Kenya?", [["nairobi"]]),
    ("What is the capital of Norway?", [["oslo"]]),
    ("What is the capital of Portugal?", [["lisbon"]]),
    ("What is the capital of Greece?", [["athens"]]),
    ("What is the capital of Russia?", [["moscow"]]),
    ("What is the capital of China?", [["beijing", "peking"]]),
    ("What is the capital of India?", [["delhi"]]),
    ("What is the capital of Mexico?", [["mexico city"]]),
    ("What is the capital of Argentina?", [["buenos aires"]]),
    ("What is the capital of Ireland?", [["dublin"]]),
    ("What is the capital of Sweden?", [["stockholm"]]),
    ("What is the capital of Thailand?", [["bangkok"]]),
    ("What is the capital of the United States?", [["washington"]]),
    ("How many days are in a week?", [["7", "seven"]]),
    ("How many legs does a spider have?", [["8", "eight"]]),
    ("How many legs does an insect have?", [["6", "six"]]),
    ("How many continents are there on Earth?", [["7", "seven"]]),
    ("How many minutes are in an hour?", [["60", "sixty"]]),
    ("How many hours are in a day?", [["24", "twenty four"]]),
    ("How many months are in a year?", [["12", "twelve"]]),
    ("How many sides does a triangle have?", [["3", "three"]]),
    ("How many sides does a hexagon have?", [["6", "six"]]),
    ("How many planets are in our solar system?", [["8", "eight"]]),
    ("How many weeks are in a year?", [["52", "fifty two"]]),
    ("How many seconds are in a minute?", [["60", "sixty"]]),
    ("How many letters are in the English alphabet?", [["26", "twenty six"]]),
    ("How many colors are in a rainbow?", [["7", "seven"]]),
    ("How many bones are in the adult human body?", [["206", "two hundred and six", "two hundred six"]]),
    ("How many players does a soccer team have on the field?", [["11", "eleven"]]),
    ("How many strings does a standard guitar have?", [["6", "six"]]),
    ("How many keys does a standard piano have?", [["88", "eighty eight"]]),
    ("How many degrees are in a right angle?", [["90", "ninety"]]),
    ("How many degrees are in a full circle?", [["360", "three hundred sixty", "three hundred and sixty"]]),
    ("What is the largest planet in our solar system?", [["jupiter"]]),
    ("Which planet is known as the Red Planet?", [["mars"]]),
    ("Which planet is closest to the Sun?", [["mercury"]]),
    ("What is the smallest planet in our solar system?", [["mercury"]]),
    ("What is the chemical symbol for gold?", [["au"]]),
    ("What is the chemical formula for water?", [["h2o"]]),
    ("What gas do plants take in from the air to make food?", [["carbon dioxide", "co2"]]),
    ("What gas do people need to breathe to stay alive?", [["oxygen"]]),
    ("At what temperature in degrees Celsius does water boil at sea level?", [["100", "one hundred"]]),
    ("At what temperature in degrees Celsius does water freeze?", [["0", "zero"]]),
    ("Who wrote the play Romeo and Juliet?", [["shakespeare"]]),
    ("Who painted the Mona Lisa?", [["leonardo", "da vinci"]]),
    ("Who was the first person to walk on the Moon?", [["armstrong"]]),
    ("Who developed the theory of relativity?", [["einstein"]]),
    ("Who wrote the novel Pride and Prejudice?", [["austen"]]),
    ("Who was the first President of the United States?", [["washington"]]),
    ("What is the largest ocean on Earth?", [["pacific"]]),
    ("What is the longest river in Africa?", [["nile"]]),
    ("What is the tallest mountain in the world?", [["everest"]]),
    ("What is the largest hot desert in the world?", [["sahara"]]),
    ("What is the largest animal on Earth?", [["blue whale"]]),
    ("What is the fastest land animal?", [["cheetah", "cheetahs"]]),
    ("What is the tallest animal in the world?", [["giraffe", "giraffes"]]),
    ("What is the largest bird in the world?", [["ostrich", "ostriches"]]),
    ("What sweet food do bees make?", [["honey"]]),
    ("What color do you get when you mix blue and yellow?", [["green"]]),
    ("What color do you get when you mix red and white?", [["pink"]]),
    ("What color do you get when you mix red and yellow?", [["orange"]]),
    ("What is the opposite of hot?", [["cold"]]),
    ("What is the opposite of up?", [["down"]]),
    ("What is the plural of mouse?", [["mice"]]),
    ("What is the plural of child?", [["children"]]),
    ("What is the past tense of go?", [["went"]]),
    ("What language is mainly spoken in Brazil?", [["portuguese"]]),
    ("What language is mainly spoken in Mexico?", [["spanish"]]),
    ("What language is mainly spoken in Germany?", [["german"]]),
    ("What is the main language spoken in Australia?", [["english"]]),
    ("What currency is used in Japan?", [["yen"]]),
    ("What currency is used in the United Kingdom?", [["pound", "pounds", "sterling"]]),
    ("What currency is used in the United States?", [["dollar", "dollars"]]),
    ("In which country are the pyramids of Giza?", [["egypt"]]),
    ("In which country is the Eiffel Tower?", [["france"]]),
    ("In which city is the Statue of Liberty?", [["new york"]]),
    ("What is the largest country in the world by area?", [["russia"]]),
    ("On which continent is Kenya?", [["africa"]]),
    ("On which continent is Brazil?", [["south america"]]),
    ("What is the smallest prime number?", [["2", "two"]]),
    ("Which organ pumps blood through the human body?", [["heart"]]),
    ("What is the largest organ of the human body?", [["skin"]]),
    ("How many teeth does an adult human usually have?", [["32", "thirty two"]]),
    ("What is the hardest natural substance?", [["diamond", "diamonds"]]),
    ("What fruit is the main ingredient in guacamole?", [["avocado", "avocados"]]),
    ("What is frozen water called?", [["ice"]]),
    ("What does a caterpillar turn into?", [["butterfly", "butterflies", "moth", "moths"]]),
    ("What is a baby cat called?", [["kitten", "kittens"]]),
    ("What is a baby dog called?", [["puppy", "puppies", "pup"]]),
    ("What is a group of lions called?", [["pride"]]),
    ("In what year did World War II end?", [["1945"]]),
    ("In what year did humans first land on the Moon?", [["1969"]]),
    ("Which animal is called the king of the jungle?", [["lion", "lions"]]),
    ("Which bird is a common symbol of peace?", [["dove", "doves"]]),
    ("What is the name of the galaxy we live in?", [["milky way"]]),
    ("What force pulls objects toward the ground?", [["gravity"]]),
    ("What is the center of an atom called?", [["nucleus"]]),
    ("Which vitamin does the skin make from sunlight?", [["vitamin d"]]),
    ("Which metal is liquid at room temperature?", [["mercury"]]),
    ("What do you call a shape with eight sides?", [["octagon"]]),
    ("What shape has four equal sides and four right angles?", [["square"]]),
    ("Which season comes after winter?", [["spring"]]),
    ("Which month has the fewest days?", [["february"]]),
    ("Which sense do we use our ears for?", [["hearing", "hear"]]),
    ("Which planet do we live on?", [["earth"]]),
]

FORMAT = [
    # sentences
    ("Describe the sun in one sentence.", {"type": "sentences", "n": 1}),
    ("Explain what a cloud is in one sentence.", {"type": "sentences", "n": 1}),
    ("Explain what a star is in one sentence.", {"type": "sentences", "n": 1}),
    ("Tell me why dogs make good pets in one sentence.", {"type": "sentences", "n": 1}),
    ("Summarize the story of Cinderella in one sentence.", {"type": "sentences", "n": 1}),
    ("Describe your favorite food in two sentences.", {"type": "sentences", "n": 2}),
    ("Explain what a river is in two sentences.", {"type": "sentences", "n": 2}),
    ("Describe a winter morning in three sentences.", {"type": "sentences", "n": 3}),
    ("Explain why people like music in three sentences.", {"type": "sentences", "n": 3}),
    # max words
    ("Describe the ocean in 10 words or fewer.", {"type": "max_words", "n": 10}),
    ("Explain what a teacher does in 15 words or fewer.", {"type": "max_words", "n": 15}),
    ("Describe a cat in 8 words or fewer.", {"type": "max_words", "n": 8}),
    ("Give a reason to read books in 12 words or fewer.", {"type": "max_words", "n": 12}),
    ("Describe a city at night in 20 words or fewer.", {"type": "max_words", "n": 20}),
    ("Explain what a phone is for in 10 words or fewer.", {"type": "max_words", "n": 10}),
    ("Say why breakfast matters in 15 words or fewer.", {"type": "max_words", "n": 15}),
    # one word
    ("Describe the color of grass in one word.", {"type": "one_word"}),
    ("What animal says moo? Answer in one word.", {"type": "one_word"}),
    ("How does ice feel to touch? Answer in one word.", {"type": "one_word"}),
    ("Name the season when leaves fall, in one word.", {"type": "one_word"}),
    ("What do you drink when you are thirsty? Answer in one word.", {"type": "one_word"}),
    ("Describe how you feel on your birthday in one word.", {"type": "one_word"}),
    # list N
    ("List three fruits.", {"type": "list", "n": 3}),
    ("List three colors.", {"type": "list", "n": 3}),
    ("Name three animals that live in the ocean.", {"type": "list", "n": 3}),
    ("List four things you can find in a kitchen.", {"type": "list", "n": 4}),
    ("Name two planets.", {"type": "list", "n": 2}),
    ("List five vegetables.", {"type": "list", "n": 5}),
    ("Name three musical instruments.", {"type": "list", "n": 3}),
    ("List two things you need to go swimming.", {"type": "list", "n": 2}),
    ("Name four countries in Europe.", {"type": "list", "n": 4}),
    ("Name three things that are cold.", {"type": "list", "n": 3}),
    # bullets
    ("Give tips for a good night's sleep using exactly 3 bullet points.", {"type": "bullets", "n": 3}),
    ("Describe a good friend using exactly 3 bullet points.", {"type": "bullets", "n": 3}),
    ("Explain how to make toast using exactly 4 bullet points.", {"type": "bullets", "n": 4}),
    ("Give reasons to exercise using exactly 2 bullet points.", {"type": "bullets", "n": 2}),
    ("Describe what to pack for a beach day using exactly 3 bullet points.", {"type": "bullets", "n": 3}),
    ("Give study tips using exactly 5 bullet points.", {"type": "bullets", "n": 5}),
    # yes / no
    ("Is the sun a star? Answer yes or no.", {"type": "yes_no", "answer": "yes"}),
    ("Can fish breathe underwater? Answer yes or no.", {"type": "yes_no", "answer": "yes"}),
    ("Is ice colder than boiling water? Answer yes or no.", {"type": "yes_no", "answer": "yes"}),
    ("Do cats have wings? Answer yes or no.", {"type": "yes_no", "answer": "no"}),
    ("Is the Moon bigger than the Earth? Answer yes or no.", {"type": "yes_no", "answer": "no"}),
    ("Is 7 an even number? Answer yes or no.", {"type": "yes_no", "answer": "no"}),
    ("Does water boil at 100 degrees Celsius at sea level? Answer yes or no.",
     {"type": "yes_no", "answer": "yes"}),
    ("Is Paris in Spain? Answer yes or no.", {"type": "yes_no", "answer": "no"}),
    # lowercase / uppercase
    ("Describe a sunny day. Respond in all lowercase letters.", {"type": "lowercase"}),
    ("Write a short greeting for a friend. Respond in all lowercase letters.", {"type": "lowercase"}),
    ("Explain what a pencil is. Respond in all lowercase letters.", {"type": "lowercase"}),
    ("Tell me about your favorite animal. Respond in all lowercase letters.", {"type": "lowercase"}),
    ("Write a short warning sign for a wet floor in all capital letters.", {"type": "uppercase"}),
    ("Write a happy birthday wish in all capital letters.", {"type": "uppercase"}),
    ("Write a short cheer for a sports team in all capital letters.", {"type": "uppercase"}),
    ("Write a sign for a closed shop in all capital letters.", {"type": "uppercase"}),
    # starts with / ends with
    ('Describe a rainy day. Start your answer with "Today".', {"type": "starts_with", "text": "Today"}),
    ('Explain why we need friends. Start your answer with "Friends".',
     {"type": "starts_with", "text": "Friends"}),
    ('Describe a good breakfast. Start your answer with "A good breakfast".',
     {"type": "starts_with", "text": "A good breakfast"}),
    ('Tell me about the ocean. Start your answer with "The ocean".',
     {"type": "starts_with", "text": "The ocean"}),
    ('Give advice to a new student. Start your answer with "Welcome".',
     {"type": "starts_with", "text": "Welcome"}),
    ('Write a short note to a friend. End your answer with the word "Bye".',
     {"type": "ends_with", "text": "Bye"}),
    ('Describe a happy dog. End your answer with the word "joy".', {"type": "ends_with", "text": "joy"}),
    ('Write a short thank-you line. End your answer with the word "thanks".',
     {"type": "ends_with", "text": "thanks"}),
    ('Describe a calm lake. End your answer with the word "peace".',
     {"type": "ends_with", "text": "peace"}),
    # include / exclude a word
    ('Write a sentence about summer. Include the word "sunshine".', {"type": "include", "text": "sunshine"}),
    ('Write a sentence about school. Include the word "pencil".', {"type": "include", "text": "pencil"}),
    ('Describe a garden. Include the word "roses".', {"type": "include", "text": "roses"}),
    ('Write a short line about the night. Include the word "stars".', {"type": "include", "text": "stars"}),
    ('Describe a kitchen. Include the word "spoon".', {"type": "include", "text": "spoon"}),
    ('Describe the sky. Do not use the word "blue".', {"type": "exclude", "text": "blue"}),
    ('Describe a lemon. Do not use the word "yellow".', {"type": "exclude", "text": "yellow"}),
    ('Describe snow. Do not use the word "white".', {"type": "exclude", "text": "white"}),
    ('Describe a fire. Do not use the word "hot".', {"type": "exclude", "text": "hot"}),
    ('Describe the night. Do not use the word "dark".', {"type": "exclude", "text": "dark"}),
    # no commas
    ("Describe a park without using any commas.", {"type": "no_commas"}),
    ("Explain how to make a sandwich without using any commas.", {"type": "no_commas"}),
    ("Describe your morning routine without using any commas.", {"type": "no_commas"}),
    ("Tell me about a favorite holiday without using any commas.", {"type": "no_commas"}),
    ("Describe a bird without using any commas.", {"type": "no_commas"}),
    # number only (with a known answer)
    ("How many wheels does a bicycle have? Reply with only a number.",
     {"type": "number_only", "answer": 2}),
    ("How many legs does a dog have? Reply with only a number.", {"type": "number_only", "answer": 4}),
    ("How many days are in a week? Reply with only a number.", {"type": "number_only", "answer": 7}),
    ("How many fingers are on one hand? Reply with only a number.", {"type": "number_only", "answer": 5}),
    ("How many months are in a year? Reply with only a number.", {"type": "number_only", "answer": 12}),
    ("How many hours are in a day? Reply with only a number.", {"type": "number_only", "answer": 24}),
    ("How many sides does a square have? Reply with only a number.", {"type": "number_only", "answer": 4}),
    ("How many minutes are in an hour? Reply with only a number.", {"type": "number_only", "answer": 60}),
    ("What is 9 plus 6? Reply with only a number.", {"type": "number_only", "answer": 15}),
    ("How many eyes does a person have? Reply with only a number.", {"type": "number_only", "answer": 2}),
    ("How many legs does a bird have? Reply with only a number.", {"type": "number_only", "answer": 2}),
    ("How many wheels does a car have? Reply with only a number.", {"type": "number_only", "answer": 4}),
]

NAMES = ["Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Omar", "Sara", "Leo", "Nina", "Raj", "Emma",
         "Kofi", "Yuki", "Lucas", "Ava"]
THINGS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "cards", "shells",
          "balloons", "oranges", "toy cars"]


def _arithmetic(rng: random.Random) -> list[tuple[str, int]]:
    """Word problems from varied templates; every answer is computed from the drawn numbers."""
    def name():
        return rng.choice(NAMES)

    def thing():
        return rng.choice(THINGS)

    def add():
        a, b, n, t = rng.randint(2, 30), rng.randint(2, 30), name(), thing()
        return f"{n} has {a} {t} and gets {b} more. How many {t} does {n} have now?", a + b

    def sub():
        a, b, n, t = rng.randint(10, 50), rng.randint(1, 9), name(), thing()
        return f"{n} had {a} {t} and gave away {b}. How many {t} are left?", a - b

    def mul():
        a, b, t = rng.randint(2, 9), rng.randint(2, 12), thing()
        return f"There are {a} boxes with {b} {t} in each box. How many {t} are there in total?", a * b

    def div():
        b, q, t = rng.randint(2, 8), rng.randint(2, 10), thing()
        return f"{b * q} {t} are shared equally among {b} children. How many does each child get?", q

    def money():
        p, k = rng.randint(2, 9), rng.randint(2, 6)
        return f"One notebook costs {p} dollars. How many dollars do {k} notebooks cost?", p * k

    def change():
        p, k, n = rng.randint(1, 4), rng.randint(2, 4), name()
        return (f"{n} buys {k} pens that cost {p} dollars each and pays with a 20 dollar bill. "
                f"How many dollars of change does {n} get back?"), 20 - p * k

    def two_step():
        a, b, c, n, t = rng.randint(5, 20), rng.randint(2, 10), rng.randint(1, 5), name(), thing()
        return (f"{n} has {a} {t}, buys {b} more, then loses {c}. "
                f"How many {t} does {n} have now?"), a + b - c

    def time_():
        h, m = rng.randint(2, 5), rng.choice([10, 15, 20, 30])
        return f"A movie lasts {h} hours and {m} minutes. How many minutes long is the movie?", h * 60 + m

    def weeks():
        w = rng.randint(2, 9)
        return f"How many days are there in {w} weeks?", w * 7

    def legs():
        d, c = rng.randint(1, 6), rng.randint(1, 6)
        return f"A farm has {d} ducks and {c} cows. How many legs do they have in total?", 2 * d + 4 * c

    def rows():
        r, s, e = rng.randint(3, 9), rng.randint(4, 10), rng.randint(1, 3)
        return (f"A room has {r} rows of {s} chairs. {e} chairs are broken. "
                f"How many chairs can be used?"), r * s - e

    def compare():
        a, b, (n1, n2) = rng.randint(20, 60), rng.randint(5, 19), rng.sample(NAMES, 2)
        return f"{n1} read {a} pages and {n2} read {b} pages. How many more pages did {n1} read?", a - b

    def half():
        a = rng.randint(3, 25) * 2
        return f"{name()} had {a} {thing()} and gave half of them to a friend. How many are left?", a // 2

    def expr():
        a, b, c = rng.randint(2, 20), rng.randint(2, 20), rng.randint(2, 9)
        form = rng.choice(["{a} + {b}", "{a} - {c}", "{c} * {b}", "{a} + {b} - {c}", "({a} + {b}) * {c}"])
        text = form.format(a=a, b=b, c=c)
        return f"What is {text}?", _safe_eval(text)

    templates = [add, sub, mul, div, money, change, two_step, time_, weeks, legs, rows, compare, half, expr]
    out, seen = [], set()
    while len(out) < 100:
        question, answer = templates[len(out) % len(templates)]()
        if question not in seen:
            seen.add(question)
            out.append((question, answer))
    return out


def _safe_eval(text: str) -> int:
    """Evaluate the tiny integer expressions used above (digits, + - * and parentheses only)."""
    assert set(text) <= set("0123456789+-*() ")
    return int(eval(text, {"__builtins__": {}}))  # safe: checked above to be digits and operators


def build_rows(seed: int = 0) -> list[dict]:
    """All prompt rows, in a fixed order, with ids ``<category>-<nnn>``."""
    rows = [{"id": f"instruction-{i:03d}", "prompt": p, "category": "instruction"}
            for i, p in enumerate(INSTRUCTIONS)]
    rows += [{"id": f"factual-{i:03d}", "prompt": q, "category": "factual", "facts": f}
             for i, (q, f) in enumerate(FACTUAL)]
    rows += [{"id": f"arithmetic-{i:03d}", "prompt": q, "category": "arithmetic", "answer": a}
             for i, (q, a) in enumerate(_arithmetic(random.Random(seed)))]
    rows += [{"id": f"format-{i:03d}", "prompt": p, "category": "format", "constraint": c}
             for i, (p, c) in enumerate(FORMAT)]
    return rows


def main() -> None:
    """Write the prompts (refusing duplicates) and print how many of each category."""
    rows = build_rows()
    prompts = [r["prompt"] for r in rows]
    assert len(set(prompts)) == len(prompts), "duplicate prompts"
    path = PROMPTS
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts = {c: sum(r["category"] == c for r in rows)
              for c in ("instruction", "factual", "arithmetic", "format")}
    print(f"wrote {len(rows)} prompts to {path}: {counts}")


if __name__ == "__main__":
    main()
