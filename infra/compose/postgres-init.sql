-- Runs once, when the postgres volume is first initialised (docker-entrypoint-initdb.d).
-- The xpando database itself is created by POSTGRES_DB; Temporal gets its own two databases
-- on the same server. The schema inside them is applied by the temporal-schema service.
CREATE DATABASE temporal;
CREATE DATABASE temporal_visibility;
