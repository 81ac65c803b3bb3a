/** A destination in its own process (for the peer-killed test): listens on argv[2], size argv[3] MiB. */
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { MigrationDestination } from "../../src/migration/destination.js";
import { MigrationListener } from "../../src/migration/transport.js";

const path = process.argv[2] as string;
const mem = new GuestMemory([GuestMemoryRegion.memfd(0, Number(process.argv[3]) * 1024 * 1024)]);
const l = await MigrationListener.listen({ kind: "unix", path });
process.stdout.write("ready\n");
const s = await l.accept();
await l.close();
await new MigrationDestination({ memory: mem }).run(s);
process.stdout.write("done\n");
