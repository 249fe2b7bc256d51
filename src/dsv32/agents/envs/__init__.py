"""Programmatic environment synthesis (issue 13 item 3, paper §3.3): categories of <environment, tools, task,
verifier> tuples generated offline from a seed. `CATEGORIES` maps each category's name to its generator;
`base` holds the shared machinery, `checks` the answer checks, `runner` what runs inside the sandbox."""

from dsv32.agents.envs.base import Category
from dsv32.agents.envs.catalog import Inventory, Library, Products, RealEstate, Recipes, Weather
from dsv32.agents.envs.logistics import Courses, FileSystem, Parcels, Sports, Warehouse
from dsv32.agents.envs.office import Bank, Budget, Calendar, Gradebook, Roster
from dsv32.agents.envs.travel import Flights, Museums, Trains
from dsv32.agents.envs.trip import Trip

CATEGORIES: dict[str, Category] = {c.name: c for c in [
    Trip(), Flights(), Trains(), Museums(),
    Calendar(), Roster(), Bank(), Budget(), Gradebook(),
    Inventory(), Library(), Products(), Recipes(), Weather(), RealEstate(),
    Warehouse(), Parcels(), FileSystem(), Courses(), Sports(),
]}
