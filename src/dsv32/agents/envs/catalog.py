"""Catalogue categories: inventories, library catalogues, product comparisons, recipes with nutrition, weather
logs, real-estate listings."""

from __future__ import annotations

import random

from dsv32.agents.envs.base import Category, Entity, Task, code, exact_task
from dsv32.agents.envs.names import ADJ, CITIES, NOUN, date, person, price, unique

# ------------------------------------------------------------------------------------------------ inventory

PRODUCTS = Entity("products", "product", "products", "category",
                  {"price": "unit price (EUR)", "stock": "stock (units)", "reorder_level": "reorder level"},
                  {"warehouse": "warehouse"}, additive=("stock",))

RESTOCK_SOLUTION = """
names = [n for c in list_categories() for n in list_products_by_category(c)]
rows = [get_product_info(n) for n in names]
low = [r for r in rows if r["stock"] < r["reorder_level"] and (warehouse is None or r["warehouse"] == warehouse)
       and (category is None or r["category"] == category)]
if op == "set":
    answer = sorted(r["name"] for r in low)
else:
    answer = round(sum((2 * r["reorder_level"] - r["stock"]) * get_supplier_price(r["name"]) for r in low), 2)
"""


class Inventory(Category):
    name = "inventory"
    description = "shop inventory: products per category and warehouse, stock, reorder levels, supplier prices"
    entities = (PRODUCTS,)
    templates = ("restock",)
    tools = '''

    def list_categories() -> list[str]:
        """All product categories."""
        return _col("SELECT DISTINCT category FROM products ORDER BY 1")


    def get_supplier_price(product: str) -> float:
        """What the supplier charges per unit of a product (EUR).

        Args:
            product: product name
        """
        return _get("suppliers", "product", product)["unit_cost"]
    '''

    def build(self, rng: random.Random) -> dict[str, list[dict]]:
        cats = rng.sample(["tools", "toys", "kitchen", "garden", "office", "outdoor", "audio"], 4)
        names = unique(rng, 28, lambda r: f"{r.choice(ADJ)} {r.choice(NOUN)} {r.choice(['Kit', 'Set', 'Pro', 'Mini'])}")
        rows = []
        for i, n in enumerate(names):
            reorder = rng.randint(5, 40)
            rows.append({"name": n, "category": cats[i % 4], "price": price(rng, 3, 250, 0.5),
                         "stock": rng.randint(0, 3 * reorder), "reorder_level": reorder,
                         "warehouse": rng.choice(["North", "South", "East"])})
        suppliers = [{"product": r["name"], "unit_cost": round(r["price"] * rng.uniform(0.4, 0.8), 2)} for r in rows]
        return {"products": rows, "suppliers": suppliers}

    def restock(self, rng: random.Random, data: dict[str, list[dict]], level: int) -> Task | None:
        cost = {s["product"]: s["unit_cost"] for s in data["suppliers"]}
        params = {"warehouse": None, "category": None, "op": "set"}
        if level >= 2:
            params["warehouse"] = rng.choice(["North", "South", "East"])
        if level != 2:
            params["category"] = rng.choice(sorted({r["category"] for r in data["products"]}))
        low = [r for r in data["products"] if r["stock"] < r["reorder_level"]
               and params["warehouse"] in (None, r["warehouse"]) and params["category"] in (None, r["category"])]
        if not low:
            return None
        where = "".join([f" in category {params['category']}" if params["category"] else "",
                         f" stored in the {params['warehouse']} warehouse" if params["warehouse"] else ""])
        if level < 3:
            prompt = (f"Which products{where} have fewer units in stock than their reorder level? Answer with a "
                      "JSON list.")
            return exact_task(prompt, code(params, RESTOCK_SOLUTION), sorted(r["name"] for r in low), "set", level,
                              "inventory.low")
        params["op"] = "cost"
        total = sum((2 * r["reorder_level"] - r["stock"]) * cost[r["name"]] for r in low)
        prompt = (f"Every product{where} whose stock is below its reorder level is refilled to twice its reorder "
                  "level at the supplier's unit price. What does the refill cost in total? Answer with a number.")
        return exact_task(prompt, code(params, RESTOCK_SOLUTION), round(total, 2), "number", level, "inventory.cost")


# ------------------------------------------------------------------------------------------------ library

BOOKS = Entity("books", "book", "books", "genre", {"year": "publication year", "pages": "page count",
                                                   "copies": "number of copies owned"}, {"author": "author"},
               additive=("pages", "copies"))

LIBRARY_SOLUTION = """
def available(title):
    return get_book_info(title)["copies"] - sum(1 for x in get_loans(title) if not x["returned"])

if op == "available":
    answer = available(title)
elif op == "author":
    answer = sorted(t for t in search_books_by_author(author) if available(t) > 0)
else:
    answer = sorted({x["member"] for m in list_members() for x in get_member_loans(m)
                     if not x["returned"] and x["due_date"] < today})
"""


class Library(Category):
    name = "library"
    description = "library catalogue: books by genre and author, copies, loans and due dates"
    entities = (BOOKS,)
    templates = ("loans",)
    tools = '''

    def list_genres() -> list[str]:
        """All genres in the catalogue."""
        return _col("SELECT DISTINCT genre FROM books ORDER BY 1")


    def search_books_by_author(author: str) -> list[str]:
        """Titles by an author.

        Args:
            author: the author's full name
        """
        return _col("SELECT name FROM books WHERE author = ? COLLATE NOCASE ORDER BY name", (author,))


    def get_loans(title: str) -> list[dict]:
        """Loans of a book: member, due date (YYYY-MM-DD) and whether it was returned (1) or not (0).

        Args:
            title: the book's title
        """
        return _rows("SELECT member, due_date, returned FROM loans WHERE book = ? COLLATE NOCASE", (title,))


    def list_members() -> list[str]:
        """All library members."""
        return _col("SELECT DISTINCT member FROM loans ORDER BY 1")


    def get_member_loans(member: str) -> list[dict]:
        """A member's loans: book, due date (YYYY-MM-DD), returned (1) or not (0).

        Args:
            member: the member's name
        """
        return _rows("SELECT member, book, due_date, returned FROM loans WHERE member = ? COLLATE NOCASE", (member,))
    '''

    def build(self, rng: random.Random) -> dict[str, list[dict]]:
        authors = unique(rng, 8, person)
        genres = rng.sample(["mystery", "fantasy", "history", "science", "poetry", "travel"], 4)
        titles = unique(rng, 32, lambda r: f"The {r.choice(ADJ)} {r.choice(NOUN)}")
        books = [{"name": t, "genre": genres[i % 4], "author": rng.choice(authors), "year": rng.randint(1950, 2024),
                  "pages": rng.randint(90, 900), "copies": rng.randint(1, 4)} for i, t in enumerate(titles)]
        members = unique(rng, 10, person)
        loans = []
        for b in books:
            for m in rng.sample(members, rng.randint(0, b["copies"])):
                loans.append({"book": b["name"], "member": m, "due_date": date(rng.randint(1, 31)),
                              "returned": int(rng.random() < 0.4)})
        return {"books": books, "loans": loans}

    def loans(self, rng: random.Random, data: dict[str, list[dict]], level: int) -> Task | None:
        out = {b["name"]: sum(1 for x in data["loans"] if x["book"] == b["name"] and not x["returned"])
               for b in data["books"]}
        avail = {b["name"]: b["copies"] - out[b["name"]] for b in data["books"]}
        params = {"title": None, "author": None, "today": None, "op": "available"}
        if level == 1:
            b = rng.choice([b for b in data["books"] if out[b["name"]]] or data["books"])
            params["title"] = b["name"]
            prompt = f"How many copies of '{b['name']}' are on the shelf now (owned copies minus unreturned loans)?"
            if avail[b["name"]] == 0:
                return None
            return exact_task(prompt, code(params, LIBRARY_SOLUTION), avail[b["name"]], "number", level,
                              "library.available")
        if level == 2:
            a = rng.choice(sorted({b["author"] for b in data["books"]}))
            titles = sorted(b["name"] for b in data["books"] if b["author"] == a and avail[b["name"]] > 0)
            if not titles or len(titles) == sum(1 for b in data["books"] if b["author"] == a):
                return None
            params.update(op="author", author=a)
            prompt = (f"Which books by {a} have at least one copy on the shelf now (owned copies minus unreturned "
                      "loans)? Answer with a JSON list of titles.")
            return exact_task(prompt, code(params, LIBRARY_SOLUTION), titles, "set", level, "library.author")
        today = date(rng.randint(8, 28))
        late = sorted({x["member"] for x in data["loans"] if not x["returned"] and x["due_date"] < today})
        if not late:
            return None
        params.update(op="overdue", today=today)
        prompt = (f"Today is {today}. Which members hold at least one unreturned loan whose due date is before "
                  "today? Answer with a JSON list of names.")
        return exact_task(prompt, code(params, LIBRARY_SOLUTION), late, "set", level, "library.overdue")


# ------------------------------------------------------------------------------------------------ products

GADGETS = Entity("gadgets", "product", "products", "category",
                 {"price": "price (EUR)", "weight": "weight (g)", "battery": "battery life (hours)",
                  "warranty": "warranty (months)"}, {"brand": "brand"}, additive=("price", "weight"))

REVIEW_SOLUTION = """
def stars(name):
    rs = get_reviews(name)
    return sum(r["stars"] for r in rs) / len(rs) if rs else 0.0

if op == "avg":
    answer = round(stars(product), 2)
else:
    rows = [get_product_info(n) for n in list_products_by_category(category)]
    rows = [r for r in rows if r["price"] <= max_price and (brand is None or r["brand"] != brand)]
    answer = max(rows, key=lambda r: stars(r["name"]))["name"]
"""


class Products(Category):
    name = "products"
    description = "product comparison: specs, prices, brands and customer reviews"
    entities = (GADGETS,)
    templates = ("reviews",)
    tools = '''

    def list_categories() -> list[str]:
        """All product categories."""
        return _col("SELECT DISTINCT category FROM gadgets ORDER BY 1")


    def get_reviews(product: str) -> list[dict]:
        """Customer reviews of a product: stars (1-5) and a short text.

        Args:
            product: product name
        """
        return _rows("SELECT stars, text FROM reviews WHERE product = ? COLLATE NOCASE", (product,))
    '''

    def build(self, rng: random.Random) -> dict[str, list[dict]]:
        cats = ["headphones", "laptops", "phones", "tablets"]
        brands = rng.sample(["Acme", "Novatek", "Zenbit", "Orbis", "Lumo", "Kestrel"], 4)
        rows = []
        for c in cats:
            for n in unique(rng, 7, lambda r, c=c: f"{r.choice(brands)} {r.choice(NOUN)} {r.randint(2, 9)}"):
                rows.append({"name": f"{n} {c[:-1].title()}", "category": c, "brand": n.split()[0],
                             "price": price(rng, 40, 1500, 1), "weight": float(rng.randint(80, 2500)),
                             "battery": round(rng.uniform(4, 30), 1), "warranty": float(rng.choice([12, 24, 36]))})
        reviews = [{"product": r["name"], "stars": rng.choices([1, 2, 3, 4, 5], [1, 1, 2, 4, 4])[0],
                    "text": rng.choice(["great", "ok", "broke fast", "worth it", "too heavy", "love it"])}
                   for r in rows for _ in range(rng.randint(2, 8))]
        return {"gadgets": rows, "reviews": reviews}

    def reviews(self, rng: random.Random, data: dict[str, list[dict]], level: int) -> Task | None:
        stars: dict[str, list[int]] = {}
        for r in data["reviews"]:
            stars.setdefault(r["product"], []).append(r["stars"])
        avg = {k: sum(v) / len(v) for k, v in stars.items()}
        params = {"product": None, "category": None, "max_price": None, "brand": None, "op": "avg"}
        if level == 1:
            p = rng.choice(data["gadgets"])["name"]
            params["product"] = p
            prompt = f"What is the average review rating (stars) of the {p}? Round to 2 decimals."
            return exact_task(prompt, code(params, REVIEW_SOLUTION), round(avg[p], 2), "number", level,
                              "products.avg_stars")
        cat = rng.choice(sorted({g["category"] for g in data["gadgets"]}))
        rows = [g for g in data["gadgets"] if g["category"] == cat]
        max_price = sorted(g["price"] for g in rows)[rng.randint(3, len(rows) - 1)]
        brand = rng.choice(sorted({g["brand"] for g in rows})) if level >= 3 else None
        rows = [g for g in rows if g["price"] <= max_price and g["brand"] != brand]
        ranked = sorted((avg[g["name"]] for g in rows), reverse=True)
        if len(ranked) < 2 or ranked[0] - ranked[1] < 1e-9:
            return None
        best = max(rows, key=lambda g: avg[g["name"]])["name"]
        params.update(op="best", category=cat, max_price=max_price, brand=brand)
        prompt = (f"Among the {cat} costing at most {max_price:g} EUR" + (f" and not made by {brand}" if brand else "")
                  + ", which has the best average review rating? Answer with the product name.")
        return exact_task(prompt, code(params, REVIEW_SOLUTION), best, "text", level, "products.best_rated")


# ------------------------------------------------------------------------------------------------ recipes

RECIPE_SOLUTION = """
def totals(name):
    kcal = protein = 0.0
    for item in get_ingredients(name):
        n = get_nutrition(item["ingredient"])
        kcal += item["grams"] * n["kcal_per_100g"] / 100
        protein += item["grams"] * n["protein_per_100g"] / 100
    servings = get_recipe(name)["servings"]
    return kcal, protein, servings

if op == "kcal":
    k, p, s = totals(recipe)
    answer = round(k / s if per_serving else k, 2)
else:
    best = None
    for name in list_recipes(cuisine):
        k, p, s = totals(name)
        if k / s <= max_kcal and (best is None or p / s > best[0]):
            best = (p / s, name)
    answer = best[1]
"""


class Recipes(Category):
    name = "recipes"
    description = "recipes with ingredients and a nutrition table"
    templates = ("nutrition",)
    tools = '''

    def list_cuisines() -> list[str]:
        """All cuisines."""
        return _col("SELECT DISTINCT cuisine FROM recipes ORDER BY 1")


    def list_recipes(cuisine: str) -> list[str]:
        """Recipe names of a cuisine.

        Args:
            cuisine: cuisine name
        """
        return _col("SELECT name FROM recipes WHERE cuisine = ? COLLATE NOCASE ORDER BY name", (cuisine,))


    def get_recipe(name: str) -> dict:
        """A recipe's cuisine, servings and minutes.

        Args:
            name: recipe name
        """
        return _get("recipes", "name", name)


    def get_ingredients(recipe: str) -> list[dict]:
        """Ingredients of a recipe with grams for the whole recipe.

        Args:
            recipe: recipe name
        """
        return _rows("SELECT ingredient, grams FROM ingredients WHERE recipe = ? COLLATE NOCASE", (recipe,))


    def get_nutrition(ingredient: str) -> dict:
        """Energy (kcal) and protein (g) per 100 g of an ingredient.

        Args:
            ingredient: ingredient name
        """
        return _get("nutrition", "ingredient", ingredient)
    '''

    def build(self, rng: random.Random) -> dict[str, list[dict]]:
        foods = ["rice", "lentils", "chicken", "tofu", "spinach", "tomato", "onion", "cheese", "pasta", "egg",
                 "salmon", "potato", "beans", "yogurt", "oats", "pepper"]
        nutrition = [{"ingredient": f, "kcal_per_100g": float(rng.randint(20, 400)),
                      "protein_per_100g": round(rng.uniform(0.5, 26), 1)} for f in foods]
        cuisines = ["italian", "indian", "mexican"]
        recipes, ingredients = [], []
        dishes = ["Stew", "Bowl", "Bake", "Salad", "Curry", "Soup"]
        for i, n in enumerate(unique(rng, 18, lambda r: f"{r.choice(ADJ)} {r.choice(dishes)}")):
            recipes.append({"name": n, "cuisine": cuisines[i % 3], "servings": rng.randint(1, 6),
                            "minutes": rng.randint(10, 90)})
            ingredients += [{"recipe": n, "ingredient": f, "grams": float(rng.randrange(20, 400, 10))}
                            for f in rng.sample(foods, rng.randint(3, 6))]
        return {"recipes": recipes, "ingredients": ingredients, "nutrition": nutrition}

    def nutrition(self, rng: random.Random, data: dict[str, list[dict]], level: int) -> Task | None:
        nut = {n["ingredient"]: n for n in data["nutrition"]}

        def totals(r: dict) -> tuple[float, float]:
            items = [i for i in data["ingredients"] if i["recipe"] == r["name"]]
            return (sum(i["grams"] * nut[i["ingredient"]]["kcal_per_100g"] / 100 for i in items),
                    sum(i["grams"] * nut[i["ingredient"]]["protein_per_100g"] / 100 for i in items))

        params = {"recipe": None, "per_serving": level == 2, "cuisine": None, "max_kcal": None, "op": "kcal"}
        if level < 3:
            r = rng.choice(data["recipes"])
            k = totals(r)[0] / (r["servings"] if level == 2 else 1)
            params["recipe"] = r["name"]
            what = "per serving" if level == 2 else "for the whole recipe"
            prompt = (f"How many kcal does the recipe '{r['name']}' have {what}? Use its ingredients' grams and the "
                      "nutrition table (per 100 g). Round to 2 decimals.")
            return exact_task(prompt, code(params, RECIPE_SOLUTION), round(k, 2), "number", level, "recipes.kcal")
        cuisine = rng.choice(["italian", "indian", "mexican"])
        rows = [(totals(r), r) for r in data["recipes"] if r["cuisine"] == cuisine]
        per = sorted(k / r["servings"] for (k, _), r in rows)
        max_kcal = float(round(per[rng.randint(1, len(per) - 1)]) + 1)
        ok = sorted(((p / r["servings"], r["name"]) for (k, p), r in rows if k / r["servings"] <= max_kcal),
                    reverse=True)
        if len(ok) < 2 or ok[0][0] - ok[1][0] < 1e-6:
            return None
        params.update(op="protein", cuisine=cuisine, max_kcal=max_kcal)
        prompt = (f"Among the {cuisine} recipes with at most {max_kcal:g} kcal per serving, which has the most protein "
                  "per serving? Answer with the recipe name.")
        return exact_task(prompt, code(params, RECIPE_SOLUTION), ok[0][1], "text", level, "recipes.protein")


# ------------------------------------------------------------------------------------------------ weather

WEATHER_SOLUTION = """
def days(city):
    return get_weather_log(city, start, end)

if op == "avg":
    rows = days(city)
    answer = round(sum(r["t_max"] for r in rows) / len(rows), 2)
elif op == "count":
    answer = sum(1 for r in days(city) if r["rain_mm"] > rain and r["t_max"] >= warm)
else:
    answer = max(list_cities(region), key=lambda c: sum(r["rain_mm"] for r in days(c)))
"""


class Weather(Category):
    name = "weather"
    description = "weather logs: daily temperature and rain per city"
    templates = ("stats",)
    tools = '''

    def list_cities(region: str) -> list[str]:
        """Cities of a region (north, south, coast, mountains) with weather logs.

        Args:
            region: region name
        """
        return _col("SELECT name FROM cities WHERE region = ? COLLATE NOCASE ORDER BY name", (region,))


    def get_weather_log(city: str, start_date: str, end_date: str) -> list[dict]:
        """Daily weather of a city between two dates (YYYY-MM-DD, inclusive): t_max, t_min (Celsius), rain_mm.

        Args:
            city: city name
            start_date: first day
            end_date: last day
        """
        return _rows("SELECT date, t_max, t_min, rain_mm FROM log WHERE city = ? COLLATE NOCASE "
                     "AND date BETWEEN ? AND ? ORDER BY date", (city, start_date, end_date))
    '''

    def build(self, rng: random.Random) -> dict[str, list[dict]]:
        regions = ["north", "south", "coast", "mountains"]
        cities = [{"name": c, "region": regions[i % 4]} for i, c in enumerate(rng.sample(CITIES, 12))]
        log = []
        for c in cities:
            base = rng.uniform(8, 24)
            for d in range(1, 31):
                t = round(base + rng.uniform(-5, 5), 1)
                log.append({"city": c["name"], "date": date(d, 9), "t_max": t,
                            "t_min": round(t - rng.uniform(4, 10), 1),
                            "rain_mm": round(max(0.0, rng.uniform(-6, 14)), 1)})
        return {"cities": cities, "log": log}

    def stats(self, rng: random.Random, data: dict[str, list[dict]], level: int) -> Task | None:
        d0 = rng.randint(1, 20)
        start, end = date(d0, 9), date(d0 + rng.randint(5, 10), 9)
        params = {"city": None, "region": None, "start": start, "end": end, "rain": None, "warm": None, "op": "avg"}
        span = f"from {start} to {end} (inclusive)"

        def rows(c: str) -> list[dict]:
            return [r for r in data["log"] if r["city"] == c and start <= r["date"] <= end]

        if level < 3:
            city = rng.choice(data["cities"])["name"]
            params["city"] = city
            if level == 1:
                prompt = f"What was the average daily maximum temperature in {city} {span}? Round to 2 decimals."
                v = round(sum(r["t_max"] for r in rows(city)) / len(rows(city)), 2)
                return exact_task(prompt, code(params, WEATHER_SOLUTION), v, "number", level, "weather.avg")
            rain, warm = rng.choice([0.0, 2.0, 5.0]), float(rng.randint(10, 22))
            n = sum(1 for r in rows(city) if r["rain_mm"] > rain and r["t_max"] >= warm)
            if n == 0:
                return None
            params.update(op="count", rain=rain, warm=warm)
            prompt = (f"On how many days {span} did {city} get more than {rain:g} mm of rain while the maximum "
                      f"temperature was at least {warm:g} C? Answer with a number.")
            return exact_task(prompt, code(params, WEATHER_SOLUTION), n, "number", level, "weather.count")
        region = rng.choice(["north", "south", "coast", "mountains"])
        totals = sorted(((sum(r["rain_mm"] for r in rows(c["name"])), c["name"]) for c in data["cities"]
                         if c["region"] == region), reverse=True)
        if totals[0][0] - totals[1][0] < 0.05:
            return None
        params.update(op="wettest", region=region)
        prompt = f"Which city of the {region} region had the most rain in total {span}? Answer with the city name."
        return exact_task(prompt, code(params, WEATHER_SOLUTION), totals[0][1], "text", level, "weather.wettest")


# ------------------------------------------------------------------------------------------------ real estate

LISTINGS = Entity("listings", "listing", "listings", "district",
                  {"price": "asking price (EUR)", "area": "floor area (m2)", "rooms": "number of rooms",
                   "built": "construction year"}, {"kind": "property type"}, additive=("price", "area", "rooms"))

PER_M2_SOLUTION = """
rows = [get_listing_info(n) for n in list_listings_by_district(district)]
rows = [r for r in rows if r["rooms"] >= min_rooms and r["built"] >= built_after
        and (kind is None or r["kind"] == kind)]
answer = min(rows, key=lambda r: r["price"] / r["area"])["name"]
"""


class RealEstate(Category):
    name = "realestate"
    description = "real-estate listings: districts, prices, areas, rooms, construction years"
    entities = (LISTINGS,)
    templates = ("per_m2",)
    tools = '''

    def list_districts() -> list[str]:
        """All districts with listings."""
        return _col("SELECT DISTINCT district FROM listings ORDER BY 1")
    '''

    def build(self, rng: random.Random) -> dict[str, list[dict]]:
        districts = [f"{c} {rng.choice(['Centre', 'Heights', 'Park', 'Docks'])}" for c in rng.sample(CITIES, 4)]
        streets = ["Street", "Lane", "Road"]
        names = unique(rng, 48, lambda r: f"{r.randint(1, 199)} {r.choice(NOUN)} {r.choice(streets)}")
        rows = []
        for i, n in enumerate(names):
            area = float(rng.randint(35, 220))
            rows.append({"name": n, "district": districts[i % 4], "kind": rng.choice(["flat", "house", "loft"]),
                         "price": float(round(area * rng.uniform(2500, 9000), -3)), "area": area,
                         "rooms": rng.randint(1, 6), "built": rng.randint(1900, 2024)})
        return {"listings": rows}

    def per_m2(self, rng: random.Random, data: dict[str, list[dict]], level: int) -> Task | None:
        district = rng.choice(sorted({r["district"] for r in data["listings"]}))
        min_rooms = rng.randint(2, 3) if level >= 2 else 0
        built_after = rng.choice([1950, 1970, 1990]) if level >= 3 else 0
        kind = rng.choice(["flat", "house"]) if level >= 3 and rng.random() < 0.5 else None
        rows = [r for r in data["listings"] if r["district"] == district and r["rooms"] >= min_rooms
                and r["built"] >= built_after and kind in (None, r["kind"])]
        ranked = sorted(r["price"] / r["area"] for r in rows)
        if len(ranked) < 2 or ranked[1] - ranked[0] < 1e-6:
            return None
        best = min(rows, key=lambda r: r["price"] / r["area"])["name"]
        conds = [f"at least {min_rooms} rooms" if min_rooms else "", f"built in {built_after} or later"
                 if built_after else "", f"of type {kind}" if kind else ""]
        conds = [c for c in conds if c]
        prompt = (f"Which listing in {district}" + (" with " + " and ".join(conds) if conds else "")
                  + " has the lowest asking price per square metre? Answer with the listing's name.")
        params = {"district": district, "min_rooms": min_rooms, "built_after": built_after, "kind": kind}
        return exact_task(prompt, code(params, PER_M2_SOLUTION), best, "text", level, "realestate.per_m2")
