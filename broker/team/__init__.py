"""team: a child's guardians and team members, from the team file to the database."""
