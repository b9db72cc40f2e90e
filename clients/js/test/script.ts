// A page script (no import or export) using the classic script's global PgGateway, typed by
// gateway.d.ts's `export as namespace PgGateway` (tsconfig.script.json).
const page: PgGateway.Gateway = PgGateway.connect({ token: "a.b.c" });
page.subscribe("user:42", (event: PgGateway.GatewayEvent<{ title: string }>) => {
  if (event.op === "insert") console.log(event.row.title);
});
// @ts-expect-error: presence topics start with "presence:"
page.presence("room:1");
