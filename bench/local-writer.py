#!/usr/bin/env python3
"""Another process writing to signaldock.db, as the cleo CLI or another agent would.

    python3 bench/local-writer.py <db-path> <from> <to> <count> <interval-ms>

Inserts <count> pending direct messages for <to>, one transaction each, about every
<interval-ms> (with jitter, so the commits fall at every phase of the reader's watch
interval). Each message's content is {"t": <epoch ms>, "i": <n>}, stamped just before the
INSERT with the same wall clock the Node side reads (time.time()), so the reader's
latency includes this process's insert and commit. Prints one JSON line when done.
"""
import json
import random
import sqlite3
import sys
import time
import uuid


def main():
    db_path, sender, recipient, count, interval_ms = sys.argv[1:6]
    count, interval_ms = int(count), float(interval_ms)
    conn = sqlite3.connect(db_path, timeout=5.0, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA foreign_keys = ON")
    conversation = ",".join(sorted([sender, recipient]))
    now_s = int(time.time())
    conn.execute(
        "INSERT OR IGNORE INTO conversations (id, participants, visibility, created_at, updated_at) "
        "VALUES (?, ?, 'private', ?, ?)",
        (conversation, conversation, now_s, now_s),
    )
    commit_ms = []
    for i in range(count):
        time.sleep(interval_ms * random.uniform(0.5, 1.5) / 1000)
        stamp = time.time() * 1000
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO messages (id, conversation_id, from_agent_id, to_agent_id, content, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (str(uuid.uuid4()), conversation, sender, recipient,
             json.dumps({"t": stamp, "i": i}), int(stamp / 1000)),
        )
        conn.execute("COMMIT")
        commit_ms.append(time.time() * 1000 - stamp)
    commit_ms.sort()
    print(json.dumps({"written": count, "commitMsP50": commit_ms[len(commit_ms) // 2],
                      "commitMsMax": commit_ms[-1]}))


if __name__ == "__main__":
    main()
