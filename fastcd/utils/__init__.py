"""Small helpers shared by every stage: atomic file writes, machine description, helper processes that end
with their parent."""
