-- The sync agent asks for pending recall requests every second ([sync]
-- recall_poll_seconds). A request row stays after it is served (one per study
-- ever recalled: up to every study of the box), and the poll scanned them all:
-- 5-9 ms a second at 100,000 rows. The pending ones are a handful; this index
-- holds only them, in the order they are served.
CREATE INDEX recall_requests_pending ON recall_requests(requested_at) WHERE state = 'pending';
