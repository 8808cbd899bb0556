-- A prefetch prior's transitions, looked up by prior: whether a C-MOVE of it was
-- ever asked (prefetch_rows.was_moved), read before each move, over a table that
-- grows with every prior the box ever prefetched.
CREATE INDEX prefetch_transitions_prior ON prefetch_transitions(prior_fk, trigger);
