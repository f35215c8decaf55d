-- The compose stack's databases: one per service (catalog is POSTGRES_DB).
CREATE DATABASE relay OWNER mall;
CREATE DATABASE members OWNER mall;
