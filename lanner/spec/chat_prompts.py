"""The open-chat prompt set a draft head is trained on: instruction templates crossed with topics.

Deterministic, shipped with the package so that `lanner train-draft` remakes the same head anywhere. The
benchmark's open-chat prompts (bench/speculative.py) are written separately and are not in this set.
"""
import random

TEMPLATES = [
    "Explain {t} in simple words.",
    "What are the main ideas behind {t}?",
    "Write a short paragraph about {t}.",
    "Give me three interesting facts about {t}.",
    "How would you teach {t} to a ten-year-old?",
    "What are the advantages and disadvantages of {t}?",
    "Write a short poem about {t}.",
    "Tell me a short story that involves {t}.",
    "What is the history of {t}?",
    "List five questions a student might ask about {t}, with short answers.",
    "Why do people find {t} important?",
    "Summarize what everyone should know about {t}.",
    "Write a friendly email to a colleague recommending they learn about {t}.",
    "What are common misconceptions about {t}?",
]

TOPICS = [
    "photosynthesis", "the water cycle", "volcanoes", "black holes", "the moon landing", "electric cars",
    "renewable energy", "recycling", "the human heart", "sleep", "healthy breakfasts", "learning to swim",
    "playing the guitar", "chess", "the Roman Empire", "ancient Egypt", "the printing press", "the internet",
    "computer programming", "machine learning", "password security", "budgeting money", "saving for retirement",
    "starting a small business", "public speaking", "time management", "gardening tomatoes", "baking bread",
    "coffee", "tea ceremonies", "honey bees", "whales", "penguins", "rainforests", "deserts", "earthquakes",
    "the solar system", "climate change", "vaccines", "the immune system", "friendship", "kindness",
    "meditation", "running a marathon", "yoga", "the Olympic Games", "football", "jazz music",
    "classical music", "painting with watercolors", "photography", "writing a novel", "libraries",
    "museums", "traveling by train", "camping", "bicycles", "airplanes", "bridges", "skyscrapers",
    "the periodic table", "magnets", "rainbows", "snowflakes", "dinosaurs", "fossils", "the ocean tides",
    "mountains", "rivers", "smartphones", "social media", "video games", "robots", "space exploration",
    "Mars", "the Great Wall of China", "pyramids", "languages", "learning Spanish", "mathematics",
    "prime numbers", "geometry", "probability", "chemistry experiments", "electricity", "batteries",
]


def chat_prompts(seed: int = 0) -> list[str]:
    """Every template x topic pair, in a fixed shuffled order."""
    prompts = [t.format(t=topic) for t in TEMPLATES for topic in TOPICS]
    random.Random(seed).shuffle(prompts)
    return prompts
